//! The host shell of the sandbox: the "Proxmox host" is this machine, so commands run as
//! local processes (argv, no shell) and files are replaced with the same compare-and-swap
//! rule as over SSH. Used with the sandbox (`driftless-sandbox`); real hosts use `ssh::SshHostShell`.

use crate::ports::{CommandOutput, Held, HeldCommand, HostShell, ShellError, append_capped};
use crate::pve::conf::digest_bytes;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Default)]
pub struct LocalShell;

/// `argv` (no shell) started with its three standard streams piped.
fn spawn(argv: &[String], kill_on_drop: bool) -> Result<tokio::process::Child, ShellError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| ShellError::Other("empty command".into()))?;
    tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(kill_on_drop)
        .spawn()
        .map_err(|e| ShellError::Connect {
            host: "localhost".into(),
            message: format!("cannot run {program}: {e}"),
        })
}

impl HostShell for LocalShell {
    async fn run(&self, _pve_node: &str, argv: &[String], stdin: &[u8]) -> Result<CommandOutput, ShellError> {
        let mut child = spawn(argv, false)?;
        // stdin is written while stdout and stderr are read: a command that answers before it
        // has read all its input must not deadlock on a full pipe.
        let mut input = child.stdin.take();
        let feed = async {
            if let Some(input) = input.as_mut() {
                input.write_all(stdin).await?;
            }
            drop(input.take());
            Ok::<(), std::io::Error>(())
        };
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (fed, stdout, stderr) = tokio::join!(feed, read_capped(stdout), read_capped(stderr));
        let (stdout, stderr) = match (stdout, stderr) {
            (Ok(o), Ok(e)) => (o, e),
            (Err(e), _) | (_, Err(e)) => {
                let _ = child.kill().await;
                return Err(match e {
                    Capped::TooMuch => ShellError::TooMuchOutput {
                        host: "localhost".into(),
                        command: argv.join(" "),
                    },
                    Capped::Io(e) => ShellError::Other(e.to_string()),
                });
            }
        };
        // A command that exits without reading its input closes the pipe: not an error.
        if let Err(e) = fed
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            return Err(ShellError::Other(e.to_string()));
        }
        let status = child.wait().await.map_err(|e| ShellError::Other(e.to_string()))?;
        Ok(CommandOutput {
            status: status.code().unwrap_or(255) as u32,
            stdout,
            stderr,
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

    async fn hold(&self, _pve_node: &str, argv: &[String], within: std::time::Duration) -> Result<Held, ShellError> {
        // The child's stdin is this process's pipe: it closes when driftless exits, however it
        // exits, and the held command ends with it.
        let mut child = spawn(argv, true)?;
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        let read = tokio::time::timeout(within, stdout.read_line(&mut line)).await;
        match read {
            Ok(Ok(n)) if n > 0 && line.ends_with('\n') => Ok(Held::Running {
                first_line: line.trim_end().to_string(),
                command: HeldCommand::new(std::sync::Mutex::new((child, stdout))),
            }),
            Ok(_) => {
                drop(child.stdin.take());
                let stderr = read_capped(child.stderr.take()).await.unwrap_or_default();
                let status = child.wait().await.map_err(|e| ShellError::Other(e.to_string()))?;
                Ok(Held::Exited(CommandOutput {
                    status: status.code().unwrap_or(255) as u32,
                    stdout: line.into_bytes(),
                    stderr,
                }))
            }
            Err(_) => Err(ShellError::Other(format!(
                "`{}` printed nothing within {} s",
                argv[0],
                within.as_secs()
            ))),
        }
    }
}

enum Capped {
    TooMuch,
    Io(std::io::Error),
}

/// Read a pipe to its end, or stop at [`MAX_COMMAND_OUTPUT`].
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>) -> Result<Vec<u8>, Capped> {
    let Some(mut pipe) = pipe else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = pipe.read(&mut chunk).await.map_err(Capped::Io)?;
        if n == 0 {
            return Ok(out);
        }
        if !append_capped(&mut out, &chunk[..n]) {
            return Err(Capped::TooMuch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::MAX_COMMAND_OUTPUT;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[tokio::test]
    async fn a_command_that_prints_without_end_is_stopped_at_the_cap() {
        let err = LocalShell
            .run("pve", &argv(&["yes", "0123456789abcdef"]), b"")
            .await
            .unwrap_err();
        assert!(matches!(err, ShellError::TooMuchOutput { .. }), "{err}");
        assert!(err.to_string().contains("more than 16 MiB"), "{err}");
    }

    #[tokio::test]
    async fn output_under_the_cap_and_its_input_arrive_whole() {
        let input = vec![b'x'; MAX_COMMAND_OUTPUT / 2];
        let out = LocalShell.run("pve", &argv(&["cat"]), &input).await.unwrap();
        assert_eq!(out.status, 0);
        assert_eq!(out.stdout.len(), input.len());
    }
}
