//! Who may read a topic, and how much of it. The socket's file mode and group are the first
//! gate (0660 or stricter); the peer's credentials from `SO_PEERCRED` are checked against the
//! topic's list on accept and decide the peer's [`Scope`].
//!
//! Tenant readers (multi-tenant isolation): a group can be admitted for one tenant
//! only. A peer admitted by the general rules (own uid, root, listed uids or groups) reads the
//! whole topic; a peer admitted only through tenant groups reads the values whose
//! [`Topic::tenant`](cairn_types::Topic::tenant) is one of its tenants, and the device-wide
//! values (`tenant() == None`). The publisher filters every frame it sends accordingly.
//!
//! Tenant technicians are not in the general technicians' group, and a socket file has one
//! group: for them to connect at all, a topic with tenant readers may have its socket file
//! mode 0666 (and only such a topic: [`Access::socket_mode`] is cut to 0660 otherwise). That
//! makes `connect` possible for any local uid, so the file mode is no longer a gate there; the
//! gate is `SO_PEERCRED`, which the kernel fills in at `connect` and a peer cannot forge: a
//! peer that no rule admits gets a `Refused` frame and the connection is closed before any
//! value is sent. The price is that strangers can open connections that live until their hello
//! (at most the hello timeout); the topic's values never reach them.

use std::collections::BTreeMap;
use std::fmt;

/// The readers a publication admits. The publisher's own uid and (unless disabled) root are
/// always admitted; everyone else must be listed by uid, or be in a listed group (primary or
/// supplementary).
#[derive(Debug, Clone)]
pub struct Access {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub allow_root: bool,
    /// Group owner of the socket file, so that members of e.g. the technicians' group can
    /// connect at all; `None` keeps the publisher's group.
    pub socket_group: Option<u32>,
    /// Permission bits of the socket file; anything beyond 0o660 is cut off, unless the topic
    /// has tenant readers: then up to 0o666 (see the module documentation).
    pub socket_mode: u32,
    /// Groups admitted for one tenant each (gid → tenant name, `""` being the default tenant):
    /// their members read only that tenant's values and the device-wide ones.
    pub tenant_readers: BTreeMap<u32, String>,
}

impl Default for Access {
    fn default() -> Self {
        Self {
            uids: Vec::new(),
            gids: Vec::new(),
            allow_root: true,
            socket_group: None,
            socket_mode: 0o660,
            tenant_readers: BTreeMap::new(),
        }
    }
}

/// How much of a topic an admitted peer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every value.
    All,
    /// The values of these tenants, and the device-wide values (`tenant() == None`).
    Tenants(Vec<String>),
}

impl Scope {
    /// Whether a value of `tenant` (`None`: device-wide) is in this scope.
    #[inline]
    pub fn admits(&self, tenant: Option<&str>) -> bool {
        match (self, tenant) {
            (Self::All, _) | (_, None) => true,
            (Self::Tenants(tenants), Some(tenant)) => tenants.iter().any(|t| t == tenant),
        }
    }

    pub fn is_all(&self) -> bool {
        matches!(self, Self::All)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => write!(f, "all tenants"),
            Self::Tenants(tenants) => {
                let names: Vec<String> = tenants.iter().map(|t| format!("{t:?}")).collect();
                write!(f, "tenants {}", names.join(", "))
            }
        }
    }
}

impl Access {
    /// Agents only (same uid and root).
    pub fn agents() -> Self {
        Self::default()
    }

    /// Also readable by the members of `gid`, e.g. the technicians' group for status topics.
    pub fn with_group_readers(gid: u32) -> Self {
        Self {
            gids: vec![gid],
            socket_group: Some(gid),
            ..Self::default()
        }
    }

    pub fn allow_uid(mut self, uid: u32) -> Self {
        self.uids.push(uid);
        self
    }

    /// Also readable, tenant by tenant, by the members of each `(tenant, gid)` group: they read
    /// that tenant's values and the device-wide ones. With at least one tenant group, the
    /// socket file becomes 0666 so that they can connect (see the module documentation).
    pub fn with_tenant_readers<S: Into<String>>(
        mut self,
        readers: impl IntoIterator<Item = (S, u32)>,
    ) -> Self {
        for (tenant, gid) in readers {
            self.tenant_readers.insert(gid, tenant.into());
        }
        if !self.tenant_readers.is_empty() {
            self.socket_mode = 0o666;
        }
        self
    }

    /// The permission bits the socket file gets: at most 0660, or 0666 for a topic with tenant
    /// readers.
    pub fn effective_socket_mode(&self) -> u32 {
        let cap = if self.tenant_readers.is_empty() {
            0o660
        } else {
            0o666
        };
        self.socket_mode & cap
    }

    /// Decides for a connected peer: its scope, or the reason given to the peer and the log.
    pub fn check(&self, peer: &Peer, publisher_uid: u32) -> Result<Scope, String> {
        let in_group = |gid: u32| peer.gid == gid || peer.groups.contains(&gid);
        let allowed = peer.uid == publisher_uid
            || (self.allow_root && peer.uid == 0)
            || self.uids.contains(&peer.uid)
            || self.gids.iter().any(|&g| in_group(g));
        if allowed {
            return Ok(Scope::All);
        }
        let mut tenants: Vec<String> = self
            .tenant_readers
            .iter()
            .filter(|(gid, _)| in_group(**gid))
            .map(|(_, tenant)| tenant.clone())
            .collect();
        if tenants.is_empty() {
            return Err(format!("{peer} is not allowed to read this topic"));
        }
        tenants.sort();
        tenants.dedup();
        Ok(Scope::Tenants(tenants))
    }
}

/// Parses a `--tenant-reader TENANT:GID` argument: the members of group GID read TENANT's values
/// (and device-wide ones). TENANT may be empty (`:4410`, the default tenant); the last `:`
/// separates it from the gid.
pub fn parse_tenant_reader(text: &str) -> Result<(String, u32), String> {
    let (tenant, gid) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?}: expected TENANT:GID"))?;
    let gid = gid
        .parse()
        .map_err(|e| format!("{text:?}: {gid:?} is not a numeric gid: {e}"))?;
    if !cairn_types::app::is_tenant_name(tenant) {
        return Err(format!(
            "{text:?}: {tenant:?} is not a tenant name (a-z, 0-9, '_' and '-', 63 at most)"
        ));
    }
    Ok((tenant.to_string(), gid))
}

/// The credentials of a connected peer.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups, read from `/proc/<pid>/status` (empty if unreadable).
    pub groups: Vec<u32>,
}

impl Peer {
    pub fn of(stream: &tokio::net::UnixStream) -> std::io::Result<Self> {
        let cred = stream.peer_cred()?;
        let pid = cred.pid();
        Ok(Self {
            uid: cred.uid(),
            gid: cred.gid(),
            pid,
            groups: pid.map(supplementary_groups).unwrap_or_default(),
        })
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} gid {}", self.uid, self.gid)?;
        if let Some(pid) = self.pid {
            write!(f, " (pid {pid})")?;
        }
        Ok(())
    }
}

fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| {
            groups
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: None,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn same_uid_root_listed_uid_and_group_members_are_admitted_others_refused() {
        let access = Access::with_group_readers(900).allow_uid(1234);
        assert!(access.check(&peer(50, 50, &[]), 50).is_ok());
        assert!(access.check(&peer(0, 0, &[]), 50).is_ok());
        assert!(access.check(&peer(1234, 1, &[]), 50).is_ok());
        assert!(access.check(&peer(77, 900, &[]), 50).is_ok());
        assert!(access.check(&peer(77, 77, &[12, 900]), 50).is_ok());
        let refused = access.check(&peer(77, 77, &[12]), 50).unwrap_err();
        assert!(refused.contains("uid 77"), "{refused}");
        let no_root = Access {
            allow_root: false,
            ..Access::agents()
        };
        assert!(no_root.check(&peer(0, 0, &[]), 50).is_err());
    }

    #[test]
    fn tenant_groups_admit_their_tenants_only_and_general_rules_win() {
        let access = Access::with_group_readers(900).with_tenant_readers([("a", 911), ("b", 912)]);
        let tenants =
            |names: &[&str]| Scope::Tenants(names.iter().map(|n| n.to_string()).collect());
        assert_eq!(access.check(&peer(77, 911, &[]), 50), Ok(tenants(&["a"])));
        assert_eq!(access.check(&peer(77, 77, &[912]), 50), Ok(tenants(&["b"])));
        assert_eq!(
            access.check(&peer(77, 77, &[912, 911]), 50),
            Ok(tenants(&["a", "b"]))
        );
        // A technician of the device is in the general group: everything.
        assert_eq!(access.check(&peer(77, 77, &[911, 900]), 50), Ok(Scope::All));
        assert_eq!(access.check(&peer(0, 0, &[]), 50), Ok(Scope::All));
        assert!(access.check(&peer(77, 77, &[913]), 50).is_err());

        let a = tenants(&["a"]);
        assert!(a.admits(Some("a")));
        assert!(!a.admits(Some("b")));
        assert!(
            !a.admits(Some("")),
            "the default tenant is a tenant like any other"
        );
        assert!(a.admits(None), "device-wide values are for every reader");
        assert!(Scope::All.admits(Some("b")));
    }

    #[test]
    fn tenant_reader_arguments_parse() {
        assert_eq!(parse_tenant_reader("acme:4411"), Ok(("acme".into(), 4411)));
        assert_eq!(parse_tenant_reader(":4410"), Ok((String::new(), 4410)));
        for bad in ["acme", "acme:", "acme:x", "Acme:1", "a b:1", "acme:-1"] {
            assert!(parse_tenant_reader(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_socket_opens_to_everyone_only_with_tenant_readers() {
        let loose = Access {
            socket_mode: 0o777,
            ..Access::agents()
        };
        assert_eq!(loose.effective_socket_mode(), 0o660);
        let tenants = Access::agents().with_tenant_readers([("a", 911)]);
        assert_eq!(tenants.effective_socket_mode(), 0o666);
        let none = Access::agents().with_tenant_readers(Vec::<(String, u32)>::new());
        assert_eq!(none.effective_socket_mode(), 0o660);
    }
}
