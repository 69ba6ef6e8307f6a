//! Attaching the programs: TC links on bridges, bridge ports and uplinks, the socket lookup
//! on the host's namespace; taking over an earlier agent's links (`BPF_LINK_UPDATE`),
//! holding them open and pinning them again when someone removes a pin.

use super::*;

impl Datapath {
    /// Attaches `toward_containers` to `bridge`'s egress, first in its TCX chain.
    pub fn attach(&mut self, bridge: &str) -> Result<()> {
        let ifindex = sys::ifindex(bridge).ok_or_else(|| DatapathError::NoSuchBridge {
            bridge: bridge.to_owned(),
        })?;
        self.attach_tc(
            program_names::TOWARD_CONTAINERS,
            bridge,
            TcAttachType::Egress,
            &egress_link(bridge),
        )?;
        info!(bridge, ifindex, "gate attached");
        self.bridges.retain(|b| b.name != bridge);
        self.bridges.push(Bridge {
            name: bridge.to_owned(),
            ifindex,
        });
        Ok(())
    }

    /// Attaches `from_containers` to the ingress of bridge port `port` (a container's veth).
    pub fn attach_port(&mut self, port: &str, ifindex: u32) -> Result<()> {
        self.attach_tc(
            program_names::FROM_CONTAINERS,
            port,
            TcAttachType::Ingress,
            &port_link(port),
        )?;
        self.ports.insert(ifindex, port.to_owned());
        Ok(())
    }

    /// Forgets ports that are gone (their links went with the device) and removes their pins.
    pub fn forget_ports(&mut self, gone: &BTreeSet<u32>) -> Result<()> {
        for ifindex in gone {
            if let Some(port) = self.ports.remove(ifindex) {
                let pin = self.pins.link(&port_link(&port));
                self.links.remove(&pin);
                remove_if_present(&pin)?;
            }
        }
        Ok(())
    }

    /// Ports with `from_containers` attached, by ifindex.
    pub fn ports(&self) -> &BTreeMap<u32, String> {
        &self.ports
    }

    /// Attaches `from_uplinks` to the ingress of `iface`, first in its TCX chain.
    pub fn attach_uplink(&mut self, iface: &str, ifindex: u32) -> Result<()> {
        self.attach_tc(
            program_names::FROM_UPLINKS,
            iface,
            TcAttachType::Ingress,
            &uplink_link(iface),
        )?;
        info!(uplink = iface, ifindex, "early drop attached");
        self.uplinks.insert(ifindex, iface.to_owned());
        Ok(())
    }

    /// Forgets uplinks that are gone or no longer wanted: detaches them, removes their pins.
    pub fn forget_uplinks(&mut self, gone: &BTreeSet<u32>) -> Result<()> {
        for ifindex in gone {
            if let Some(iface) = self.uplinks.remove(ifindex) {
                let pin = self.pins.link(&uplink_link(&iface));
                self.links.remove(&pin);
                if pin.exists() {
                    sys::detach_pinned_link(&pin).map_err(io_err(&pin))?;
                }
                remove_if_present(&pin)?;
            }
        }
        Ok(())
    }

    /// Uplinks with `from_uplinks` attached, by ifindex.
    pub fn uplinks(&self) -> &BTreeMap<u32, String> {
        &self.uplinks
    }

    /// Attaches `host_ports` to the agent's network namespace (the host's).
    pub fn attach_host_ports(&mut self) -> Result<()> {
        let name = program_names::HOST_PORTS;
        let pin = self.pins.link(HOST_PORTS_LINK);
        let program = sk_lookup(&mut self.ebpf, name)?;
        let program_fd = owned_fd(name, program.fd(), &pin)?;
        let link = take_over_or_create(&pin, program_fd.as_fd(), || {
            let attach_err = |source| DatapathError::Attach {
                target: "the host network namespace".to_owned(),
                source,
            };
            let netns = fs::File::open("/proc/self/ns/net")
                .map_err(io_err(Path::new("/proc/self/ns/net")))?;
            let id = program.attach(netns).map_err(attach_err)?;
            Ok(program.take_link(id).map_err(attach_err)?.into())
        })?;
        self.links.insert(pin, link);
        Ok(())
    }

    /// Opens the black-hole sockets (TCP at index 0, UDP at 1) and hands them to
    /// `host_ports`, so that connections it refuses time out instead of being refused.
    pub fn open_black_holes(&mut self) -> Result<()> {
        let name = map_names::BLACK_HOLE;
        let path = Path::new("black-hole socket");
        let mut sockets = Vec::new();
        for (index, stream) in [(0u32, true), (1, false)] {
            let socket = sys::black_hole_socket(stream).map_err(io_err(path))?;
            let mut map: aya::maps::SockMap<_> =
                aya::maps::SockMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
            map.set(index, &socket, 0).map_err(map_err(name))?;
            sockets.push(socket);
        }
        self.black_holes = sockets;
        Ok(())
    }

    pub(super) fn attach_tc(
        &mut self,
        name: &'static str,
        interface: &str,
        attach_type: TcAttachType,
        link_name: &str,
    ) -> Result<()> {
        let pin = self.pins.link(link_name);
        let program = classifier(&mut self.ebpf, name)?;
        let program_fd = owned_fd(name, program.fd(), &pin)?;
        let link = take_over_or_create(&pin, program_fd.as_fd(), || {
            let attach_err = |source| DatapathError::Attach {
                target: interface.to_owned(),
                source,
            };
            let id = program
                .attach_with_options(
                    interface,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(attach_err)?;
            program
                .take_link(id)
                .map_err(attach_err)?
                .try_into()
                .map_err(|source| DatapathError::Link {
                    path: pin.clone(),
                    source,
                })
        })?;
        self.links.insert(pin, link);
        Ok(())
    }

    /// Pins again every held link whose pin someone removed; returns the paths re-pinned.
    pub fn repin(&self) -> Vec<PathBuf> {
        let mut repinned = Vec::new();
        for (path, link) in &self.links {
            if path.exists() {
                continue;
            }
            match sys::obj_pin(link.as_fd(), path) {
                Ok(()) => repinned.push(path.clone()),
                Err(err) => warn!(path = %path.display(), "cannot pin the link again: {err}"),
            }
        }
        repinned
    }

    /// Whether the gate is still attached to `bridge`: the same device is there (not deleted,
    /// or deleted and re-created), and the agent holds its link.
    pub fn is_attached(&self, bridge: &Bridge) -> bool {
        sys::ifindex(&bridge.name) == Some(bridge.ifindex)
            && self
                .links
                .contains_key(&self.pins.link(&egress_link(&bridge.name)))
    }
}

/// Opens the link pinned at `pin` and swaps its program for `program` in one step (the hook
/// never runs without a gate: an earlier agent's link, taken over on restart or upgrade);
/// where there is none, or it is defunct (its interface was deleted), `create` attaches a new
/// link, which is pinned. Either way the link is returned open, for the agent to hold.
pub(super) fn take_over_or_create(
    pin: &Path,
    program: BorrowedFd<'_>,
    create: impl FnOnce() -> Result<FdLink>,
) -> Result<OwnedFd> {
    if let Some(link) = take_over(pin, program)? {
        return Ok(link);
    }
    create()?.pin(pin).map_err(|source| DatapathError::Pin {
        path: pin.to_owned(),
        source,
    })?;
    sys::obj_get(pin).map_err(|source| DatapathError::LinkIo {
        path: pin.to_owned(),
        source,
    })
}

/// The link pinned at `pin`, now running `program`; `None` when there is none or it is
/// defunct (its pin is then removed).
pub(super) fn take_over(pin: &Path, program: BorrowedFd<'_>) -> Result<Option<OwnedFd>> {
    match sys::obj_get(pin) {
        Ok(link) => match sys::update_link(link.as_fd(), program) {
            Ok(()) => Ok(Some(link)),
            Err(err) => {
                warn!(pin = %pin.display(), "cannot reuse pinned link ({err}); attaching anew");
                remove_if_present(pin)?;
                Ok(None)
            }
        },
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DatapathError::LinkIo {
            path: pin.to_owned(),
            source,
        }),
    }
}

/// A descriptor of its own for program `name`'s fd, kept while the program is borrowed to
/// attach it.
pub(super) fn owned_fd(
    name: &'static str,
    fd: std::result::Result<&aya::programs::ProgramFd, ProgramError>,
    pin: &Path,
) -> Result<OwnedFd> {
    fd.map_err(|source| DatapathError::Program { name, source })?
        .as_fd()
        .try_clone_to_owned()
        .map_err(io_err(pin))
}

pub(super) fn sk_lookup<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SkLookup> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

pub(super) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}
