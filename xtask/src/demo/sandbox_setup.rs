//! Setting the demo's sandbox up: the namespaces and their wiring, the container's web
//! server, and the agent.

use super::*;

impl Sandbox {
    pub(super) fn build_topology(&mut self) -> Result<()> {
        heading("sandbox: three network namespaces stand in for a container host");
        println!(
            "  {client}: the client 10.98.0.2, somewhere outside
  {host}: the host, routing (ip_forward=1) between 10.98.0.1 and the bridge {BRIDGE} 10.99.0.1
  {ctr}: a container 10.99.0.2 on {BRIDGE}, serving HTTP on port 80
Nothing here touches the machine's own network namespace.\n",
            client = self.client,
            host = self.host,
            ctr = self.container,
        );
        for ns in [
            self.host.clone(),
            self.client.clone(),
            self.container.clone(),
        ] {
            ip_checked(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            ip_checked(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (h, c, k) = (
            self.host.as_str(),
            self.client.as_str(),
            self.container.as_str(),
        );

        println!("$ (in {h}) echo 1 > /proc/sys/net/ipv4/ip_forward");
        in_netns_thread(h, || fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?
            .context("cannot enable ip_forward in the host namespace")?;

        // Client <-> host.
        ip_checked(&[
            "-n",
            h,
            "link",
            "add",
            "veth-client",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            c,
        ])?;
        ip_checked(&[
            "-n",
            h,
            "addr",
            "add",
            &format!("{HOST_ADDR}/24"),
            "dev",
            "veth-client",
        ])?;
        ip_checked(&["-n", h, "link", "set", "veth-client", "up"])?;
        ip_checked(&[
            "-n",
            c,
            "addr",
            "add",
            &format!("{CLIENT_ADDR}/24"),
            "dev",
            "eth0",
        ])?;
        ip_checked(&["-n", c, "link", "set", "eth0", "up"])?;
        ip_checked(&["-n", c, "route", "add", "default", "via", HOST_ADDR])?;

        // The bridge and the container.
        ip_checked(&["-n", h, "link", "add", BRIDGE, "type", "bridge"])?;
        ip_checked(&[
            "-n",
            h,
            "addr",
            "add",
            &format!("{BRIDGE_ADDR}/24"),
            "dev",
            BRIDGE,
        ])?;
        ip_checked(&["-n", h, "link", "set", BRIDGE, "up"])?;
        ip_checked(&[
            "-n", h, "link", "add", "veth-ctr", "type", "veth", "peer", "name", "eth0", "netns", k,
        ])?;
        ip_checked(&["-n", h, "link", "set", "veth-ctr", "master", BRIDGE])?;
        ip_checked(&["-n", h, "link", "set", "veth-ctr", "up"])?;
        ip_checked(&[
            "-n",
            k,
            "addr",
            "add",
            &format!("{CONTAINER_ADDR}/24"),
            "dev",
            "eth0",
        ])?;
        ip_checked(&["-n", k, "link", "set", "eth0", "up"])?;
        ip_checked(&["-n", k, "route", "add", "default", "via", BRIDGE_ADDR])?;
        Ok(())
    }

    pub(super) fn start_server(&mut self) -> Result<()> {
        heading("the container's HTTP server");
        let mut cmd = Command::new("socat");
        cmd.arg(format!("TCP-LISTEN:{PORT},fork,reuseaddr"))
            .arg(format!("SYSTEM:echo HTTP/1.0 200 OK; echo; echo {BODY}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: Ctrl-C reaches only this program, which stops it in order.
            .process_group(0);
        println!("$ (in {}) {} &", self.container, proc::display(&cmd));
        self.server = Some(spawn_in_netns(&self.container, &mut cmd)?);
        // Wait until it listens (or fail if it exited).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(server) = self.server.as_mut()
                && let Some(status) = server.try_wait().context("waiting for socat")?
            {
                bail!("the HTTP server (socat) exited at once ({status})");
            }
            let addr = SocketAddr::from(([127, 0, 0, 1], PORT));
            if in_netns_thread(&self.container, move || {
                TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            })?
            .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the HTTP server (socat) does not listen on port {PORT} after 5 s");
            }
            proc::sleep(Duration::from_millis(100))?;
        }
    }

    pub(super) fn start_agent(&mut self) -> Result<()> {
        heading("starting the portgate agent in the host namespace");
        fs::create_dir_all(self.dir.join("state"))
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let log = File::create(&self.log)
            .with_context(|| format!("cannot create {}", self.log.display()))?;
        let log_err = log
            .try_clone()
            .context("cannot duplicate the log file handle")?;
        let mut cmd = Command::new(&self.portgate);
        cmd.args(["agent", "--bridge", BRIDGE, "--runtime", "none", "--bpffs"])
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        println!(
            "$ (in {}) {} 2>{} &",
            self.host,
            proc::display(&cmd),
            self.log.display()
        );
        println!(
            "(entered with setns(2), not `ip netns exec`, which would remount /sys and hide /sys/fs/bpf;\n \
             --runtime none: the sandbox's \"container\" is a namespace, not a Docker or Podman container)"
        );
        self.agent = Some(spawn_in_netns(&self.host, &mut cmd)?);
        self.agent_spawned = true;

        let started = Instant::now();
        loop {
            proc::check_interrupted()?;
            if let Some(agent) = self.agent.as_mut()
                && let Some(status) = agent.try_wait().context("waiting for the agent")?
            {
                self.agent = None;
                bail!("the agent exited during start-up ({status})");
            }
            let mut status = self.portgate_command(&["status"]);
            if proc::capture(&mut status, CLI_TIMEOUT)?.status.success() {
                break;
            }
            if started.elapsed() >= AGENT_READY_TIMEOUT {
                bail!(
                    "the agent did not answer `portgate status` within {} s",
                    AGENT_READY_TIMEOUT.as_secs()
                );
            }
            proc::sleep(Duration::from_millis(200))?;
        }
        println!(
            "agent ready after {:.1} s (its control socket answers)",
            started.elapsed().as_secs_f64()
        );
        println!(
            "The commands below talk to it with --socket {} (on a real host the default, /run/portgate/portgate.sock, needs no option).",
            self.socket.display()
        );
        Ok(())
    }
}
