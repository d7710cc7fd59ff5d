//! `pct` on the sandbox's state: what an SSH session as root on the node runs.
//!
//! Supported: `pct set VMID --KEY VALUE ... [--delete a,b] [--revert a] [--digest D]`,
//! `pct config VMID [--current]`, `pct status VMID`, `pct list`, and `pct push` / `pct exec` on the
//! simulated containers (`k3s_sim`). Values are validated with the API
//! schema of `PUT /nodes/{node}/lxc/{vmid}/config`; the caller is `root@pam`, so features,
//! device passthrough and bind mounts are allowed (unlike through an API token). A running
//! container gets the same pending/hot-plug treatment as through the API.

use std::collections::BTreeMap;
use std::path::Path;

use crate::SandboxError;
use crate::guest::{self, ApiError, Changes};
use crate::store::Store;
use driftless::pve::api_schema::ApiSchema;
use driftless::pve::conf::{PveKind, encode_text};

const SET_USAGE: &str = "pct set <vmid> [OPTIONS]";

/// Run `pct ARGS` against the sandbox state in `state_dir`; the output pct prints, or its
/// error text (`SandboxError::Pct`).
pub fn pct(state_dir: &Path, args: &[String]) -> Result<String, SandboxError> {
    let store = Store::discover(state_dir)?;
    let Some(cmd) = args.first() else {
        return Err(SandboxError::Pct(
            "ERROR: no command specified\nUSAGE: pct <COMMAND> [ARGS] [OPTIONS]".into(),
        ));
    };
    match cmd.as_str() {
        "set" => set(&store, &args[1..]),
        "config" => config(&store, &args[1..]),
        "status" => status(&store, &args[1..]),
        "list" => Ok(list(&store)),
        "push" => crate::k3s_sim::push(state_dir, &args[1..]),
        "exec" => Err(SandboxError::Pct(
            "ERROR: `pct exec` has an exit status of its own: use sandbox::pct_exec".into(),
        )),
        other => Err(SandboxError::Pct(format!(
            "ERROR: unknown command 'pct {other}' (the sandbox knows set, config, status, list, push, exec)"
        ))),
    }
}

fn fail(e: ApiError, usage: &str) -> SandboxError {
    let mut msg = if e.status == 500 {
        e.message.trim_end().to_string()
    } else {
        format!("{} {}", e.status, e.message.trim_end())
    };
    for (k, v) in &e.errors {
        msg.push_str(&format!("\n{k}: {}", v.trim_end()));
    }
    if e.status == 400 {
        msg.push('\n');
        msg.push_str(usage);
    }
    SandboxError::Pct(msg)
}

/// The vmid and the `--key value` options after it.
fn parse_args(args: &[String], usage: &str) -> Result<(u32, BTreeMap<String, String>), SandboxError> {
    let usage_err = |m: String| SandboxError::Pct(format!("{m}\n{usage}"));
    let Some(vmid_arg) = args.first() else {
        return Err(usage_err("400 not enough arguments".into()));
    };
    let vmid: u32 = vmid_arg
        .parse()
        .ok()
        .filter(|v| *v >= 100)
        .ok_or_else(|| usage_err(format!("400 Parameter verification failed.\nvmid: invalid format - value does not look like a valid VM ID ('{vmid_arg}')")))?;
    let endpoint = ApiSchema::embedded()
        .find("PUT", "/nodes/pve/lxc/100/config")
        .map(|(e, _)| e);
    let mut opts = BTreeMap::new();
    let mut i = 1;
    while i < args.len() {
        let arg = &args[i];
        let Some(name) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(usage_err(format!("400 too many arguments: '{arg}'")));
        };
        let (key, inline) = match name.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (name.to_string(), None),
        };
        let prop = endpoint.and_then(|e| ApiSchema::embedded().property(e, &key));
        let is_bool = prop.is_some_and(|p| p.ty.as_deref() == Some("boolean"));
        let value = match inline {
            Some(v) => v,
            None => match args.get(i + 1) {
                Some(v) if !(is_bool && v.starts_with('-')) => {
                    i += 1;
                    v.clone()
                }
                _ if is_bool => "1".to_string(),
                _ => return Err(usage_err(format!("400 missing value for option '{key}'"))),
            },
        };
        opts.insert(key, value);
        i += 1;
    }
    Ok((vmid, opts))
}

fn locate(store: &Store, vmid: u32) -> Result<String, ApiError> {
    match store.find(vmid) {
        Some((node, PveKind::Lxc)) => Ok(node),
        _ => {
            let node = store.nodes.first().cloned().unwrap_or_else(|| "pve".into());
            Err(ApiError::die(format!(
                "Configuration file '{}' does not exist",
                Store::cfs_path(&node, PveKind::Lxc, vmid)
            )))
        }
    }
}

fn set(store: &Store, args: &[String]) -> Result<String, SandboxError> {
    let (vmid, mut opts) = parse_args(args, SET_USAGE)?;
    let schema = ApiSchema::embedded();
    let node = locate(store, vmid).map_err(|e| fail(e, SET_USAGE))?;
    let mut params = opts.clone();
    params.insert("node".into(), node.clone());
    params.insert("vmid".into(), vmid.to_string());
    if let Some((endpoint, _)) = schema.find("PUT", &format!("/nodes/{node}/lxc/{vmid}/config")) {
        schema
            .validate(endpoint, &params)
            .map_err(|e| fail(ApiError::params(e), SET_USAGE))?;
    }
    let digest = opts.remove("digest");
    if opts.is_empty() {
        return Err(fail(ApiError::die("no options specified"), SET_USAGE));
    }
    let delete = guest::split_list(&opts.remove("delete").unwrap_or_default());
    let revert = guest::split_list(&opts.remove("revert").unwrap_or_default());
    for opt in delete.iter().chain(revert.iter()) {
        if !guest::option_exists(PveKind::Lxc, opt) {
            let which = if delete.contains(opt) { "delete" } else { "revert" };
            return Err(fail(
                ApiError::param(which, format!("unknown option '{opt}'")),
                SET_USAGE,
            ));
        }
    }
    let loaded = store
        .load(&node, PveKind::Lxc, vmid)
        .map_err(|e| fail(e.into(), SET_USAGE))?
        .ok_or_else(|| {
            let path = Store::cfs_path(&node, PveKind::Lxc, vmid);
            fail(
                ApiError::die(format!("Configuration file '{path}' does not exist")),
                SET_USAGE,
            )
        })?;
    let mut conf = loaded.conf;
    if let Some(lock) = conf.options.get("lock") {
        return Err(fail(ApiError::die(format!("CT is locked ({lock})")), SET_USAGE));
    }
    if digest.as_deref().is_some_and(|d| !d.is_empty() && d != loaded.digest) {
        return Err(fail(
            ApiError::die("detected modified configuration - file changed by other user? Try again."),
            SET_USAGE,
        ));
    }
    let running = store.is_running(vmid);
    let changes = Changes {
        set: opts,
        delete,
        revert,
    };
    guest::lxc_update(&mut conf, vmid, running, &changes, store.read_seed()).map_err(|e| fail(e, SET_USAGE))?;
    store
        .write(&node, PveKind::Lxc, vmid, &conf)
        .map_err(|e| fail(e.into(), SET_USAGE))?;
    Ok(String::new())
}

fn config(store: &Store, args: &[String]) -> Result<String, SandboxError> {
    let usage = "pct config <vmid> [OPTIONS]";
    let (vmid, opts) = parse_args(args, usage)?;
    if let Some(k) = opts.keys().find(|k| k.as_str() != "current") {
        return Err(SandboxError::Pct(format!(
            "Unknown option: {k}\n400 unable to parse option\n{usage}"
        )));
    }
    let node = locate(store, vmid).map_err(|e| fail(e, usage))?;
    let loaded = store
        .load(&node, PveKind::Lxc, vmid)
        .map_err(|e| fail(e.into(), usage))?
        .ok_or_else(|| fail(ApiError::die("configuration file vanished"), usage))?;
    let current = opts.get("current").map(String::as_str) == Some("1");
    let s = guest::effective_section(&loaded.conf, current);
    let mut out = String::new();
    for key in guest::skeys(&s) {
        let Some(v) = guest::sget(&s, &key) else { continue };
        let v = if key == "description" { encode_text(&v) } else { v };
        out.push_str(&format!("{key}: {v}\n"));
    }
    for (k, v) in &s.raw_lxc {
        out.push_str(&format!("{k}: {v}\n"));
    }
    Ok(out)
}

/// `pct list`: the containers of the node, as pct prints them.
fn list(store: &Store) -> String {
    let mut out = format!("{:<10} {:<10} {:<12} {:<20}\n", "VMID", "Status", "Lock", "Name");
    for g in store.list().into_iter().filter(|g| g.kind == PveKind::Lxc) {
        let status = if store.is_running(g.vmid) { "running" } else { "stopped" };
        let lock = g.conf.options.get("lock").cloned().unwrap_or_default();
        let name = g.conf.options.get("hostname").cloned().unwrap_or_default();
        out.push_str(&format!("{:<10} {:<10} {:<12} {:<20}\n", g.vmid, status, lock, name));
    }
    out
}

fn status(store: &Store, args: &[String]) -> Result<String, SandboxError> {
    let usage = "pct status <vmid> [OPTIONS]";
    let (vmid, _) = parse_args(args, usage)?;
    locate(store, vmid).map_err(|e| fail(e, usage))?;
    let state = if store.is_running(vmid) { "running" } else { "stopped" };
    Ok(format!("status: {state}\n"))
}
