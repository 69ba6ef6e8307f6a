//! portgate's user-space side: the host agent and the pieces the CLI shares with it.

pub mod agent;
pub mod api;
pub mod cli;
pub mod datapath;
pub mod exposure;
pub mod lock;
pub mod metrics;
pub mod netfilter;
pub mod policy;
pub mod ports;
pub mod runtime;
