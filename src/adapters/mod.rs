pub mod local_shell;
pub mod proxmox;
pub mod shell_quote;
pub mod ssh;
pub mod tls;
pub mod kube;
pub mod talos;
