//! portgate's user-space side: the host agent and its parts (the `portgate` binary's command
//! line lives in the binary, src/cli/).

pub mod agent;
pub mod api;
pub mod datapath;
pub mod exposure;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod netfilter;
pub mod policy;
pub mod ports;
pub mod procfs;
pub mod runtime;
pub mod units;
