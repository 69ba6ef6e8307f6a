//! The sandbox topology the demo, the bench and the tests share: a client namespace, a
//! host namespace with a bridge, a container namespace on it. Each sandbox's namespaces are
//! its own, so the fixed names and addresses never collide between sandboxes.
//!
//! ```text
//!  client               host (ip_forward=1)                       container
//!  10.98.0.2/24  ───  10.98.0.1/24
//!  fd98::2/64          fd98::1/64
//!                      pgbr0 10.99.0.1/24, fd99::1/64 ─────────  10.99.0.2/24, fd99::2/64
//! ```

/// The bridge the gate guards, in the host namespace.
pub const BRIDGE: &str = "pgbr0";

pub const HOST_V4: &str = "10.98.0.1";
pub const HOST_V6: &str = "fd98::1";
pub const CLIENT_V4: &str = "10.98.0.2";
pub const CLIENT_V6: &str = "fd98::2";
pub const BRIDGE_V4: &str = "10.99.0.1";
pub const BRIDGE_V6: &str = "fd99::1";
pub const CONTAINER_V4: &str = "10.99.0.2";
pub const CONTAINER_V6: &str = "fd99::2";
