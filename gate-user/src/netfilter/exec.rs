//! Running the firewall tools: absolute paths, arguments only (never a shell), and errors that
//! name the command and quote its stderr.

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use super::NetfilterError;

/// Where the tools live when the agent's PATH lacks the sbin directories (it often does under
/// a service manager or `sudo` with a restricted PATH).
const FALLBACK_DIRS: [&str; 5] = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"];

/// The absolute path of an executable `name`, or None when this host does not have it (that
/// backend is then simply absent, not an error).
pub(crate) fn find_binary(name: &str) -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// One invocation of a firewall tool.
pub(super) struct Invocation<'a> {
    program: &'a Path,
    args: Vec<String>,
    stdin: Option<String>,
}

impl<'a> Invocation<'a> {
    pub(super) fn new(
        program: &'a Path,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            program,
            args: args.into_iter().map(Into::into).collect(),
            stdin: None,
        }
    }

    pub(super) fn stdin(mut self, input: String) -> Self {
        self.stdin = Some(input);
        self
    }

    /// The command line as a user would type it, for errors and logs.
    pub(super) fn display(&self) -> String {
        let mut line = self
            .program
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.program.display().to_string());
        for arg in &self.args {
            line.push(' ');
            if arg.is_empty()
                || arg
                    .chars()
                    .any(|c| c.is_whitespace() || c == '"' || c == '\'')
            {
                line.push('\'');
                line.push_str(&arg.replace('\'', "'\\''"));
                line.push('\'');
            } else {
                line.push_str(arg);
            }
        }
        if let Some(input) = &self.stdin {
            line.push_str(" <<< ");
            line.push_str(input);
        }
        line
    }

    /// Runs it and returns its output, whatever the exit status.
    pub(super) fn output(&self) -> Result<Output, NetfilterError> {
        let spawn_error = |source| NetfilterError::Spawn {
            command: self.display(),
            source,
        };
        let mut command = Command::new(self.program);
        command
            .args(&self.args)
            // Stable, untranslated messages (matched below) whatever the host's locale.
            .env("LC_ALL", "C")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let Some(input) = &self.stdin else {
            command.stdin(Stdio::null());
            return command.output().map_err(spawn_error);
        };
        command.stdin(Stdio::piped());
        let mut child = command.spawn().map_err(spawn_error)?;
        if let Some(mut pipe) = child.stdin.take() {
            // A write error (the tool exited early) shows up in its exit status and stderr.
            let _ = pipe.write_all(input.as_bytes());
        }
        child.wait_with_output().map_err(spawn_error)
    }

    /// Runs it; a non-zero exit is an error naming the command and quoting its stderr.
    pub(super) fn run(&self) -> Result<String, NetfilterError> {
        let output = self.output()?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(self.failed(&output))
        }
    }

    pub(super) fn failed(&self, output: &Output) -> NetfilterError {
        NetfilterError::Command {
            command: self.display(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        }
    }
}
