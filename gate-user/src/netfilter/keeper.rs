//! Keeps the delegation rules in place from a thread of its own.

use std::{
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use tracing::error;

use super::{Delegation, DelegationStatus};

/// How often the rules are checked, and restored where a firewall reload removed them.
const RECHECK: Duration = Duration::from_secs(2);

/// Keeps the netfilter delegation rules in place from a thread of its own: iptables may wait
/// seconds for its lock, which must not stall the agent loop.
pub struct NetfilterKeeper {
    bridges: mpsc::Sender<Vec<String>>,
    status: Arc<Mutex<Vec<DelegationStatus>>>,
}

impl NetfilterKeeper {
    /// Starts the thread; it runs until the keeper is dropped (the rules stay, as the gate does).
    pub fn start() -> Self {
        let (bridges, wanted) = mpsc::channel::<Vec<String>>();
        let status = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&status);
        std::thread::spawn(move || {
            let mut delegation = Delegation::new();
            loop {
                let result = match wanted.recv_timeout(RECHECK) {
                    Ok(bridges) => delegation.ensure(&bridges).map(drop),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        delegation.check_and_restore().map(drop)
                    }
                    // The agent is stopping; the rules stay, as the gate does.
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                };
                if let Err(err) = result {
                    error!("netfilter delegation rules: {:#}", anyhow::Error::from(err));
                }
                if let Ok(mut status) = shared.lock() {
                    *status = delegation.status();
                }
            }
        });
        Self { bridges, status }
    }

    /// Makes the rules for exactly these bridges be in place.
    pub fn ensure(&self, bridges: Vec<String>) {
        if self.bridges.send(bridges).is_err() {
            error!("the netfilter keeper thread is gone; delegation rules are no longer checked");
        }
    }

    pub fn status(&self) -> Vec<DelegationStatus> {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}
