//! iptables helpers.

use super::*;

/// The rules (`-A ...` lines) of `chain` through iptables binary `bin`.
pub fn iptables_rules(bin: &str, chain: &str) -> Vec<String> {
    let output = Command::new(bin)
        .args(["-S", chain])
        .output()
        .unwrap_or_else(|e| panic!("run {bin} -S {chain}: {e}"));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_owned)
        .collect()
}

/// Splits an `iptables -S` line into arguments (double quotes group, as iptables prints them).
pub fn split_rule(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut has = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                has = true;
            }
            c if c.is_whitespace() && !quoted => {
                if has {
                    args.push(std::mem::take(&mut current));
                    has = false;
                }
            }
            c => {
                current.push(c);
                has = true;
            }
        }
    }
    if has {
        args.push(current);
    }
    args
}

/// Deletes one rule printed by `iptables -S` (`-A CHAIN SPEC` -> `-D CHAIN SPEC`).
pub fn iptables_delete(bin: &str, rule_line: &str) {
    let mut args = split_rule(rule_line);
    assert_eq!(
        args.first().map(String::as_str),
        Some("-A"),
        "not a rule: {rule_line}"
    );
    args[0] = "-D".into();
    run_ok(Command::new(bin).args(&args));
}

/// A rule of the operator's, inserted at the top of `chain` and deleted on drop.
pub struct OperatorRule {
    bin: String,
    chain: String,
    spec: Vec<String>,
}

impl OperatorRule {
    pub fn insert(bin: &str, chain: &str, spec: &[&str]) -> Self {
        let spec: Vec<String> = spec.iter().map(|s| (*s).to_owned()).collect();
        run_ok(Command::new(bin).args(["-I", chain]).args(&spec));
        OperatorRule {
            bin: bin.to_owned(),
            chain: chain.to_owned(),
            spec,
        }
    }
}

impl Drop for OperatorRule {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .args(["-D", &self.chain])
            .args(&self.spec)
            .output();
    }
}

/// An nftables table of the operator's with a forward-hook filter chain whose policy is drop
/// (a host firewall written for nft, as in netavark#977), deleted on drop.
pub struct OperatorNftTable {
    pub family: &'static str,
    pub name: String,
    pub chain: &'static str,
}

impl OperatorNftTable {
    /// `table inet <name> { chain forward { type filter hook forward priority 0; policy
    /// drop; <rules> } }`.
    pub fn forward_drop(name: &str, rules: &[&str]) -> Self {
        let table = OperatorNftTable {
            family: "inet",
            name: name.replace('-', "_"),
            chain: "forward",
        };
        let mut script = format!(
            "table inet {} {{\n chain forward {{\n  type filter hook forward priority 0; policy drop;\n",
            table.name
        );
        for rule in rules {
            script.push_str(&format!("  {rule}\n"));
        }
        script.push_str(" }\n}\n");
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("run nft -f -");
        child
            .stdin
            .take()
            .expect("nft stdin")
            .write_all(script.as_bytes())
            .expect("write to nft");
        let status = child.wait().expect("wait for nft");
        assert!(status.success(), "nft -f - failed ({status}) on:\n{script}");
        table
    }

    /// The chain as `status --json` names it: "inet <name> forward".
    pub fn status_chain(&self) -> String {
        format!("{} {} {}", self.family, self.name, self.chain)
    }
}

impl Drop for OperatorNftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", self.family, &self.name])
            .output();
    }
}

/// The rules (`-A ...` lines) of `chain` in `table` through iptables binary `bin`.
pub fn iptables_rules_in(bin: &str, table: &str, chain: &str) -> Vec<String> {
    let output = Command::new(bin)
        .args(["-t", table, "-S", chain])
        .output()
        .unwrap_or_else(|e| panic!("run {bin} -t {table} -S {chain}: {e}"));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_owned)
        .collect()
}
