//! Who may read a topic. The socket's file mode and group are the first gate (0660 or stricter);
//! the peer's credentials from `SO_PEERCRED` are checked against the topic's list on accept.

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
    /// Permission bits of the socket file; anything beyond 0o660 is cut off.
    pub socket_mode: u32,
}

impl Default for Access {
    fn default() -> Self {
        Self {
            uids: Vec::new(),
            gids: Vec::new(),
            allow_root: true,
            socket_group: None,
            socket_mode: 0o660,
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

    /// Decides for a connected peer; `Err` carries the reason given to the peer and the log.
    pub fn check(&self, peer: &Peer, publisher_uid: u32) -> Result<(), String> {
        let allowed = peer.uid == publisher_uid
            || (self.allow_root && peer.uid == 0)
            || self.uids.contains(&peer.uid)
            || self.gids.contains(&peer.gid)
            || peer.groups.iter().any(|g| self.gids.contains(g));
        if allowed {
            Ok(())
        } else {
            Err(format!("{peer} is not allowed to read this topic"))
        }
    }
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
}
