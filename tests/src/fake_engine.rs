//! The fake Docker engine the sandbox tests use (shared with the bench).
pub use portgate_fake_docker::{EngineState, FakeEngine};
