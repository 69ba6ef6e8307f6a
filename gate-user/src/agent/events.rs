//! What arrives while the agent runs: engine snapshots, drop events from the datapath (to
//! `watch` clients), and the programs' own log lines.

use super::*;

impl Agent {
    pub(super) fn on_runtime_event(&mut self, event: RuntimeEvent) {
        match event {
            RuntimeEvent::Synced {
                engine,
                snapshot,
                after_event,
            } => {
                let Some(state) = self.engines.get_mut(&engine) else {
                    return;
                };
                if !state.connected {
                    info!(%engine, "engine connected");
                }
                state.connected = true;
                state.last_error = None;
                state.syncs += 1;
                state.events += u64::from(after_event);
                if state.snapshot.as_ref() == Some(&snapshot) {
                    return;
                }
                state.snapshot = Some(snapshot);
                if let Err(err) = self
                    .attach_bridges(false)
                    .and_then(|()| self.reconcile())
                    .and_then(|()| self.sync_ports())
                {
                    error!("applying {engine}'s containers failed: {err:#}");
                }
            }
            RuntimeEvent::Disconnected { engine, error } => {
                let Some(state) = self.engines.get_mut(&engine) else {
                    return;
                };
                if state.connected || state.last_error.is_none() {
                    warn!(%engine, socket = %state.socket.display(), "engine unreachable ({error}); enforcing what is known, reconnecting");
                }
                state.connected = false;
                state.last_error = Some(error);
            }
        }
    }

    pub(super) fn on_drop_event(&mut self, drop: Option<DropEvent>) {
        let Some(drop) = drop else {
            // Lost between the kernel and this loop (queue full).
            self.drop_events.suppressed += 1;
            return;
        };
        self.drop_events.reported += 1;
        self.drop_events.suppressed += u64::from(drop.suppressed);
        if self.watchers.receiver_count() == 0 {
            return;
        }
        let destination = addr_from_map(drop.dst);
        let container = self
            .engines
            .values()
            .filter_map(|s| s.snapshot.as_ref())
            .flat_map(|s| &s.containers)
            .find(|c| {
                c.addresses.contains(&destination)
                    // A rootless container's port is a socket of the host: by host port.
                    || (c.is_rootless()
                        && c.published.iter().any(|p| {
                            p.host_port == drop.dst_port
                                && p.protocol.to_string() == protocol_name(drop.proto)
                                && (p.host_ip.is_unspecified() || p.host_ip == destination)
                        }))
            });
        let event = WatchEvent {
            time: humantime::format_rfc3339_millis(wall_clock(drop.timestamp_ns)).to_string(),
            bridge: self.bridge_name(drop.ifindex),
            source: addr_from_map(drop.src).to_string(),
            source_port: drop.src_port,
            destination: destination.to_string(),
            destination_port: drop.dst_port,
            protocol: protocol_name(drop.proto),
            reason: counter_name(u32::from(drop.reason)),
            container: container.map(|c| c.name.clone()),
            audit: drop.audit != 0,
            suppressed: drop.suppressed,
        };
        let _ = self.watchers.send(event);
    }
}

/// The wall-clock time of a `bpf_ktime_get_ns` (CLOCK_MONOTONIC) timestamp.
pub(super) fn wall_clock(monotonic_ns: u64) -> SystemTime {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let now_ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    SystemTime::now() - Duration::from_nanos(now_ns.saturating_sub(monotonic_ns))
}

/// Moves drop events from the kernel's ring buffer to the agent loop. `None` stands for an
/// event lost because the loop is behind.
pub(super) async fn read_drop_events(
    mut ring: AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
    events: mpsc::Sender<Option<DropEvent>>,
) {
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(err) => {
                warn!("drop event buffer unreadable: {err}");
                return;
            }
        };
        while let Some(item) = guard.get_inner_mut().next() {
            let event = datapath::decode_drop_event(&item);
            match events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Report the loss once there is room again.
                    if events.send(None).await.is_err() {
                        return;
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        guard.clear_ready();
    }
}

/// Streams drop events to one `portgate watch` client as JSON lines, until it hangs up.
pub(super) async fn stream_watch(
    mut stream: UnixStream,
    mut events: broadcast::Receiver<WatchEvent>,
) {
    loop {
        let line = match events.recv().await {
            Ok(event) => serde_json::to_string(&event).map(|mut l| {
                l.push('\n');
                l
            }),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                warn!(missed, "a watch client fell behind");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Ok(line) = line else { continue };
        if stream.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Forwards the programs' aya-log records to tracing (through the `log` bridge).
pub(super) async fn drain_ebpf_logs(
    logs: Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>,
) {
    let Some(mut logs) = logs else { return };
    loop {
        match logs.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(err) => {
                warn!("eBPF log buffer unreadable: {err}");
                return;
            }
        }
    }
}
