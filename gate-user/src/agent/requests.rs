//! Answers to the control socket's requests: allow, deny, mode, list, status.

use std::collections::BTreeSet;

use anyhow::bail;
use tracing::{error, info};

use super::{Agent, reconcile::not_fitted_warning};
use crate::{
    api::{Changed, Reply, Request, Response},
    datapath::GateConfig,
    policy::{Ports, Target},
};

impl Agent {
    pub(super) fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Allow {
                target,
                ports,
                published,
            } => self.change(&target, ports.as_deref(), published, true),
            Request::Deny {
                target,
                ports,
                published,
            } => self.change(&target, ports.as_deref(), published, false),
            Request::List => self.list().map(Reply::List),
            Request::Status => self.status().map(|s| Reply::Status(Box::new(s))),
            Request::Mode { audit } => self.set_mode(audit),
            // Served by `serve`, which hands the connection to a streaming task.
            Request::Watch => Err(anyhow::anyhow!("watch is a streaming request")),
        };
        match result {
            Ok(reply) => Response::Ok(reply),
            Err(err) => Response::Error(format!("{err:#}")),
        }
    }

    /// Switches between enforce and audit; the flow table is untouched, so tracked
    /// connections carry on either way.
    pub(super) fn set_mode(&mut self, audit: bool) -> anyhow::Result<Reply> {
        let gate = GateConfig {
            audit,
            ..self.options.gate
        };
        self.datapath.set_config(gate)?;
        self.options.gate = gate;
        let mode = if audit {
            "audit: nothing is dropped, would-be drops are counted"
        } else {
            "enforce"
        };
        let message = format!("mode {mode}; tracked connections kept");
        info!("{message}");
        Ok(Reply::Changed(Changed {
            message,
            rules: Vec::new(),
            warnings: Vec::new(),
        }))
    }

    /// Applies an allow or deny: saved first, then written to the map. If the map write
    /// fails, the previous rules are restored in both places.
    pub(super) fn change(
        &mut self,
        target: &str,
        ports: Option<&str>,
        published: bool,
        allow: bool,
    ) -> anyhow::Result<Reply> {
        let target: Target = target.parse()?;
        let ports = match (ports, published) {
            (Some(_), true) => bail!("give either ports or --published, not both"),
            (None, false) => bail!("which ports? give PORTS (e.g. 80/tcp) or --published"),
            (Some(spec), false) => Ports::Spec(spec.parse()?),
            (None, true) => Ports::Published,
        };
        let mut next = self.rules.clone();
        let mut message = if allow {
            let id = next.allow(target.clone(), ports)?;
            format!("allowed {target} {ports} (rule {id})")
        } else {
            next.deny(&target, ports)?;
            format!("denied {target} {ports}; established connections continue")
        };
        let old_ids: BTreeSet<u32> = self.rules.rules().iter().map(|r| r.id).collect();
        let new_ids: BTreeSet<u32> = next
            .rules()
            .iter()
            .map(|r| r.id)
            .filter(|id| !old_ids.contains(id))
            .collect();
        self.store.save(&next)?;
        let previous = std::mem::replace(&mut self.rules, next);
        if let Err(err) = self
            .datapath
            .reset_rule_stats(&new_ids)
            .map_err(anyhow::Error::from)
            .and_then(|()| self.reconcile())
        {
            error!("applying rules failed, restoring the previous ones: {err:#}");
            self.rules = previous;
            self.store.save(&self.rules)?;
            self.reconcile()?;
            return Err(err);
        }
        info!("{message}");
        let rules = self.views(|r| r.target == target);
        if allow && matches!(target, Target::Container(_)) && !rules.iter().any(|r| r.active) {
            message.push_str("; no such container is running: the rule waits for it (inactive)");
        }
        let warnings = not_fitted_warning(&self.allow_sync, self.datapath.capacities().allow)
            .into_iter()
            .collect();
        Ok(Reply::Changed(Changed {
            message,
            rules,
            warnings,
        }))
    }
}
