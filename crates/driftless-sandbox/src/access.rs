//! Who may do what: users, API tokens and their ACLs, computed the way pve-access-control
//! does it (`PVE::AccessControl::roles`, `PVE::RPCEnvironment::permissions`).
//!
//! * Privileges come from roles; the built-in roles are made from the privilege groups of
//!   `AccessControl.pm` (PVE 9) as `create_roles` makes them (`PVEAuditor`, `PVEVMAdmin`, ...,
//!   `Administrator` with every privilege, `NoAccess` with none).
//! * An ACL entry gives a user or a token roles on a path; walking from `/` down to the path,
//!   the entries of a level replace what was inherited (when they propagate, or at the path
//!   itself). Groups and pools are not simulated.
//! * A token without privilege separation has its user's privileges; with it, the
//!   intersection of its user's and its own. `root@pam` (and its tokens without privilege
//!   separation) may do everything.
//! * Without any ACL configured ([`Acl`] is `None` in the options), every token is treated as
//!   root's token without privilege separation: the sandbox's historical behaviour.

use std::collections::{BTreeMap, BTreeSet};

use crate::guest::ApiError;

/// The privilege groups of pve-access-control (`$privgroups`): category, then the privileges
/// of its `root`, `admin`, `user` and `audit` levels.
const PRIV_GROUPS: &[(&str, [&[&str]; 4])] = &[
    (
        "VM",
        [
            &[],
            &[
                "VM.Config.Disk",
                "VM.Config.CPU",
                "VM.Config.Memory",
                "VM.Config.Network",
                "VM.Config.HWType",
                "VM.Config.Options",
                "VM.Allocate",
                "VM.Clone",
                "VM.GuestAgent.Unrestricted",
                "VM.Migrate",
                "VM.Replicate",
                "VM.Snapshot",
                "VM.Snapshot.Rollback",
            ],
            &[
                "VM.Config.CDROM",
                "VM.Config.Cloudinit",
                "VM.Console",
                "VM.Backup",
                "VM.GuestAgent.FileRead",
                "VM.GuestAgent.FileSystemMgmt",
                "VM.GuestAgent.FileWrite",
                "VM.PowerMgmt",
            ],
            &["VM.Audit", "VM.GuestAgent.Audit"],
        ],
    ),
    (
        "Sys",
        [
            &["Sys.PowerMgmt", "Sys.Modify", "Sys.Incoming", "Sys.AccessNetwork"],
            &["Sys.Console", "Sys.Syslog"],
            &[],
            &["Sys.Audit"],
        ],
    ),
    (
        "Datastore",
        [
            &[],
            &["Datastore.Allocate", "Datastore.AllocateTemplate"],
            &["Datastore.AllocateSpace"],
            &["Datastore.Audit"],
        ],
    ),
    (
        "SDN",
        [&[], &["SDN.Allocate", "SDN.Audit"], &["SDN.Use"], &["SDN.Audit"]],
    ),
    (
        "User",
        [
            &["Realm.Allocate"],
            &["User.Modify", "Group.Allocate", "Realm.AllocateUser"],
            &[],
            &[],
        ],
    ),
    ("Pool", [&[], &["Pool.Allocate"], &["Pool.Audit"], &["Pool.Audit"]]),
    (
        "Mapping",
        [&[], &["Mapping.Modify"], &["Mapping.Use"], &["Mapping.Audit"]],
    ),
];

/// Every valid privilege name (`$valid_privs`).
pub fn all_privileges() -> BTreeSet<String> {
    let mut out: BTreeSet<String> = PRIV_GROUPS
        .iter()
        .flat_map(|(_, levels)| levels.iter().flat_map(|l| l.iter()))
        .map(|p| p.to_string())
        .collect();
    out.insert("Permissions.Modify".into());
    out
}

/// The built-in roles (`create_roles`).
pub fn builtin_roles() -> BTreeMap<String, BTreeSet<String>> {
    let mut roles: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    roles.insert("Administrator".into(), all_privileges());
    roles.insert("NoAccess".into(), BTreeSet::new());
    for (cat, [_, admin, user, audit]) in PRIV_GROUPS {
        for p in admin.iter().chain(user.iter()).chain(audit.iter()) {
            roles.entry(format!("PVE{cat}Admin")).or_default().insert(p.to_string());
            roles.entry("PVEAdmin".into()).or_default().insert(p.to_string());
        }
        if !user.is_empty() {
            for p in user.iter().chain(audit.iter()) {
                roles.entry(format!("PVE{cat}User")).or_default().insert(p.to_string());
            }
        }
        for p in audit.iter() {
            roles.entry("PVEAuditor".into()).or_default().insert(p.to_string());
        }
    }
    // Only Administrator (and PVEMappingAdmin) may modify mappings.
    if let Some(admin) = roles.get_mut("PVEAdmin") {
        admin.remove("Mapping.Modify");
    }
    roles.insert(
        "PVETemplateUser".into(),
        ["VM.Clone", "VM.Audit"].iter().map(|p| p.to_string()).collect(),
    );
    roles
}

/// One ACL entry: `pveum acl modify PATH --users|--tokens SUBJECT --roles ROLES [--propagate 0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclEntry {
    pub path: String,
    /// `user@realm` or a token id `user@realm!token`.
    pub subject: String,
    pub roles: Vec<String>,
    pub propagate: bool,
}

impl AclEntry {
    pub fn new(path: &str, subject: &str, roles: &[&str]) -> AclEntry {
        AclEntry {
            path: path.to_string(),
            subject: subject.to_string(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            propagate: true,
        }
    }
}

/// The access control configuration: custom roles, ACL entries, and which tokens are
/// privilege-separated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// `pveum role add NAME --privs "..."`.
    pub roles: BTreeMap<String, Vec<String>>,
    pub entries: Vec<AclEntry>,
    /// Token ids created with `--privsep 1`; every other token has its user's privileges.
    pub privsep: BTreeSet<String>,
}

impl Acl {
    /// Refuse what pveum refuses: unknown privileges, unknown roles, malformed paths.
    pub fn check(&self) -> Result<(), String> {
        let valid = all_privileges();
        let builtin = builtin_roles();
        for (role, privs) in &self.roles {
            if builtin.contains_key(role) {
                return Err(format!("role '{role}' is a built-in role"));
            }
            for p in privs {
                if !valid.contains(p) {
                    return Err(format!("invalid privilege '{p}'"));
                }
            }
        }
        for e in &self.entries {
            if !e.path.starts_with('/') || (e.path.len() > 1 && e.path.ends_with('/')) {
                return Err(format!("invalid ACL path '{}'", e.path));
            }
            for r in &e.roles {
                if !builtin.contains_key(r) && !self.roles.contains_key(r) {
                    return Err(format!("role '{r}' does not exist"));
                }
            }
        }
        Ok(())
    }

    fn role_privs(&self, role: &str) -> BTreeSet<String> {
        if let Some(p) = self.roles.get(role) {
            return p.iter().cloned().collect();
        }
        builtin_roles().remove(role).unwrap_or_default()
    }

    /// `PVE::AccessControl::roles` for one subject (no groups, no pools): role -> propagate.
    fn roles(&self, subject: &str, path: &str) -> BTreeMap<String, bool> {
        if subject == "root@pam" {
            return BTreeMap::from([("Administrator".to_string(), true)]);
        }
        let levels = acl_levels(path);
        let mut roles = BTreeMap::new();
        for (i, level) in levels.iter().enumerate() {
            let last = i + 1 == levels.len();
            let mut new: Option<BTreeMap<String, bool>> = None;
            for e in self.entries.iter().filter(|e| e.subject == subject && &e.path == level) {
                if last || e.propagate {
                    let map = new.get_or_insert_with(BTreeMap::new);
                    for r in &e.roles {
                        map.insert(r.clone(), e.propagate);
                    }
                }
            }
            if let Some(new) = new {
                roles = new;
            }
        }
        roles
    }

    /// Privilege -> propagate, for one subject alone.
    fn subject_privs(&self, subject: &str, path: &str) -> BTreeMap<String, bool> {
        let mut privs: BTreeMap<String, bool> = BTreeMap::new();
        for (role, propagate) in self.roles(subject, path) {
            for p in self.role_privs(&role) {
                let e = privs.entry(p).or_insert(false);
                *e = *e || propagate;
            }
        }
        privs
    }

    /// `PVE::RPCEnvironment::permissions`: the privileges `authid` has on `path`, each with
    /// its propagate flag.
    pub fn permissions(&self, authid: &str, path: &str) -> BTreeMap<String, bool> {
        let Some((user, _)) = authid.split_once('!') else {
            return self.subject_privs(authid, path);
        };
        let user_privs = self.subject_privs(user, path);
        if !self.privsep.contains(authid) {
            return user_privs;
        }
        self.subject_privs(authid, path)
            .into_iter()
            .filter_map(|(p, prop)| user_privs.get(&p).map(|up| (p, prop && *up)))
            .collect()
    }

    /// `get_effective_permissions`: every top-level path and every ACL path where `authid`
    /// has a privilege.
    pub fn effective(&self, authid: &str) -> BTreeMap<String, BTreeMap<String, bool>> {
        let mut paths: BTreeSet<String> = [
            "/",
            "/access",
            "/access/groups",
            "/nodes",
            "/pool",
            "/sdn",
            "/storage",
            "/vms",
        ]
        .iter()
        .map(|p| p.to_string())
        .collect();
        paths.extend(self.entries.iter().map(|e| e.path.clone()));
        paths
            .into_iter()
            .filter_map(|p| {
                let privs = self.permissions(authid, &p);
                (!privs.is_empty()).then_some((p, privs))
            })
            .collect()
    }
}

/// `/vms/100` as the levels the ACL tree is walked through: `/`, `/vms`, `/vms/100`.
fn acl_levels(path: &str) -> Vec<String> {
    let mut out = vec!["/".to_string()];
    let mut cur = String::new();
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        cur.push('/');
        cur.push_str(seg);
        out.push(cur.clone());
    }
    out
}

/// One caller's view of the ACLs: what the handlers ask (`$rpcenv->check`, `check_any`).
pub(crate) struct Perms<'a> {
    pub authid: &'a str,
    /// `None`: no ACL configured, every caller may do everything.
    pub acl: Option<&'a Acl>,
}

impl Perms<'_> {
    pub fn has(&self, path: &str, privilege: &str) -> bool {
        match self.acl {
            None => true,
            Some(acl) => self.authid == "root@pam" || acl.permissions(self.authid, path).contains_key(privilege),
        }
    }

    /// `$rpcenv->check`: every privilege, the first missing one named in the 403.
    pub fn check(&self, path: &str, privs: &[&str]) -> Result<(), ApiError> {
        for p in privs {
            if !self.has(path, p) {
                return Err(ApiError::perm(&format!("{path}, {p}")));
            }
        }
        Ok(())
    }

    /// `$rpcenv->check_any`.
    pub fn check_any(&self, path: &str, privs: &[&str]) -> Result<(), ApiError> {
        if privs.iter().any(|p| self.has(path, p)) {
            Ok(())
        } else {
            Err(ApiError::perm(&format!("{path}, {}", privs.join("|"))))
        }
    }

    /// `$rpcenv->check_vm_perm` without pools.
    pub fn check_vm(&self, vmid: u32, privs: &[&str]) -> Result<(), ApiError> {
        self.check(&format!("/vms/{vmid}"), privs)
    }

    /// `check_vnet_access` for a bridge without SDN: `SDN.Use` on the local zone's bridge
    /// (or on the VLAN below it when the NIC is tagged).
    pub fn check_bridge(&self, bridge: &str, tag: Option<&str>) -> Result<(), ApiError> {
        match tag {
            Some(t) if !t.is_empty() => self.check(&format!("/sdn/zones/localnetwork/{bridge}/{t}"), &["SDN.Use"]),
            _ => self.check(&format!("/sdn/zones/localnetwork/{bridge}"), &["SDN.Use"]),
        }
    }

    /// `PVE::Storage::check_volume_access` for templates and ISOs: read access to the storage.
    pub fn check_template_access(&self, volid: &str) -> Result<(), ApiError> {
        match volid.split_once(':') {
            Some((sid, _)) => self.check_any(
                &format!("/storage/{sid}"),
                &["Datastore.AllocateSpace", "Datastore.Audit"],
            ),
            None => Ok(()),
        }
    }

    /// The API schema's `permissions.check` (`["perm", PATH, [PRIVS], "any", 1]`), with the
    /// path's `{param}`s filled in. Other forms (`userid-group`, ...) are not simulated.
    pub fn check_schema(&self, check: &serde_json::Value, params: &BTreeMap<String, String>) -> Result<(), ApiError> {
        let Some(list) = check.as_array() else { return Ok(()) };
        if list.first().and_then(|v| v.as_str()) != Some("perm") {
            return Ok(());
        }
        let Some(template) = list.get(1).and_then(|v| v.as_str()) else {
            return Ok(());
        };
        let privs: Vec<&str> = list
            .get(2)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
            .unwrap_or_default();
        let any = list.get(3).and_then(|v| v.as_str()) == Some("any");
        let mut path = template.to_string();
        for (k, v) in params {
            path = path.replace(&format!("{{{k}}}"), v);
        }
        if any {
            self.check_any(&path, &privs)
        } else {
            self.check(&path, &privs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl() -> Acl {
        Acl {
            roles: BTreeMap::from([(
                "Apply".to_string(),
                vec!["VM.Audit".to_string(), "VM.Allocate".to_string()],
            )]),
            entries: vec![
                AclEntry::new("/vms", "driftless@pve", &["Apply"]),
                AclEntry::new("/", "driftless@pve!plan", &["PVEAuditor"]),
                AclEntry::new("/vms/105", "driftless@pve", &["NoAccess"]),
            ],
            privsep: BTreeSet::from(["driftless@pve!plan".to_string()]),
        }
    }

    #[test]
    fn deeper_entries_replace_inherited_ones_and_tokens_follow_their_user() {
        let a = acl();
        a.check().unwrap();
        let p = a.permissions("driftless@pve!apply", "/vms/100");
        assert!(p.contains_key("VM.Allocate") && p.contains_key("VM.Audit"), "{p:?}");
        assert!(a.permissions("driftless@pve!apply", "/vms/105").is_empty());
        assert!(a.permissions("driftless@pve!apply", "/storage/local").is_empty());
        // privsep: the intersection of the user's and the token's.
        let plan = a.permissions("driftless@pve!plan", "/vms/100");
        assert_eq!(plan.keys().collect::<Vec<_>>(), ["VM.Audit"]);
        assert!(a.permissions("root@pam!x", "/").contains_key("Sys.Modify"));
    }

    #[test]
    fn pveum_refusals() {
        let mut a = acl();
        a.roles.insert("Bad".into(), vec!["VM.Alocate".into()]);
        assert_eq!(a.check().unwrap_err(), "invalid privilege 'VM.Alocate'");
        let mut a = acl();
        a.entries.push(AclEntry::new("/", "x@pve", &["Nope"]));
        assert_eq!(a.check().unwrap_err(), "role 'Nope' does not exist");
        let auditor = &builtin_roles()["PVEAuditor"];
        assert!(auditor.contains("VM.Audit") && !auditor.contains("VM.Allocate"));
    }

    #[test]
    fn checks_name_what_is_missing_as_proxmox_does() {
        let a = acl();
        let p = Perms {
            authid: "driftless@pve!apply",
            acl: Some(&a),
        };
        assert_eq!(
            p.check("/vms/100", &["VM.PowerMgmt"]).unwrap_err().message,
            "Permission check failed (/vms/100, VM.PowerMgmt)\n"
        );
        assert_eq!(
            p.check_any("/storage/local", &["Datastore.AllocateSpace", "Datastore.Audit"])
                .unwrap_err()
                .message,
            "Permission check failed (/storage/local, Datastore.AllocateSpace|Datastore.Audit)\n"
        );
        let check = serde_json::json!(["perm", "/vms/{vmid}", ["VM.Audit"]]);
        let params = BTreeMap::from([("vmid".to_string(), "100".to_string())]);
        assert!(p.check_schema(&check, &params).is_ok());
    }
}
