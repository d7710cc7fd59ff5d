//! The host shell of the sandbox: the "Proxmox host" is this machine, so commands run as
//! local processes (argv, no shell) and files are replaced with the same compare-and-swap
//! rule as over SSH. Used with the sandbox (`driftless-sandbox`); real hosts use `ssh::SshHostShell`.

use crate::ports::{CommandOutput, HostShell, ShellError};
use crate::pve::conf::digest_bytes;
use std::path::Path;
use tokio::io::AsyncWriteExt;

#[derive(Debug, Clone, Default)]
pub struct LocalShell;

impl HostShell for LocalShell {
    async fn run(&self, _pve_node: &str, argv: &[String], stdin: &[u8]) -> Result<CommandOutput, ShellError> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| ShellError::Other("empty command".into()))?;
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| ShellError::Connect {
                host: "localhost".into(),
                message: format!("cannot run {program}: {e}"),
            })?;
        if let Some(mut input) = child.stdin.take() {
            input
                .write_all(stdin)
                .await
                .map_err(|e| ShellError::Other(e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| ShellError::Other(e.to_string()))?;
        Ok(CommandOutput {
            status: out.status.code().unwrap_or(255) as u32,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    async fn read_file(&self, _pve_node: &str, path: &str) -> Result<Vec<u8>, ShellError> {
        tokio::fs::read(path)
            .await
            .map_err(|e| ShellError::Other(format!("cannot read {path}: {e}")))
    }

    async fn write_file_if_unchanged(
        &self,
        _pve_node: &str,
        path: &str,
        contents: &[u8],
        expected_sha1: &str,
    ) -> Result<(), ShellError> {
        let current = tokio::fs::read(path)
            .await
            .map_err(|e| ShellError::Other(format!("cannot read {path}: {e}")))?;
        if digest_bytes(&current) != expected_sha1 {
            return Err(ShellError::Changed {
                host: "localhost".into(),
                path: path.into(),
            });
        }
        let tmp = format!("{path}.tmp.{}", std::process::id());
        tokio::fs::write(&tmp, contents)
            .await
            .map_err(|e| ShellError::Other(format!("cannot write {tmp}: {e}")))?;
        tokio::fs::rename(&tmp, Path::new(path))
            .await
            .map_err(|e| ShellError::Other(format!("cannot replace {path}: {e}")))
    }
}
