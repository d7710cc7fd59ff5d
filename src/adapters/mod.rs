pub mod known_hosts;
pub mod kube;
pub mod local_shell;
pub mod proxmox;
pub(crate) mod shell_quote;
pub mod ssh;
pub mod talos;
pub mod tls;
