//! Consistency groups, shared by both sources.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cairn_types::ConsistencyGroup;
use uuid::Uuid;

use super::{ConfigError, DeviceConfig};

/// Checks the groups against the apps and hands each member its group. `list` is the groups'
/// name in the source (`groups` in the local file, `cairn_groups` in the protobuf).
///
/// - a group has an id, members, each an app of this config, each in no other group;
/// - a group snapshot (a snapshot with a group id) is listed by every member of one group, so
///   that its members arrive in one config and none waits for a request that never comes;
/// - an app that lists a group snapshot is a member of a group.
pub(super) fn apply_groups(
    config: &mut DeviceConfig,
    groups: Vec<ConsistencyGroup>,
    list: &str,
) -> Result<(), ConfigError> {
    let apps: HashMap<Uuid, usize> = config
        .apps
        .iter()
        .enumerate()
        .map(|(i, a)| (a.app_uuid(), i))
        .collect();
    let mut ids: HashMap<Uuid, usize> = HashMap::new();
    let mut member_of: HashMap<Uuid, usize> = HashMap::new();
    for (i, group) in groups.iter().enumerate() {
        let at = format!("{list}[{i}]");
        if group.id.is_nil() {
            return Err(ConfigError::at(
                format!("{at}.id"),
                "a group needs an id (a UUID, not nil)",
            ));
        }
        if let Some(first) = ids.insert(group.id, i) {
            return Err(ConfigError::at(
                format!("{at}.id"),
                format!("group {} appears twice (also {list}[{first}])", group.id),
            ));
        }
        if group.members.is_empty() {
            return Err(ConfigError::at(
                format!("{at}.members"),
                format!("group {} has no members", group.id),
            ));
        }
        for (j, member) in group.members.iter().enumerate() {
            let at = format!("{at}.members[{j}]");
            if !apps.contains_key(member) {
                return Err(ConfigError::at(
                    at,
                    format!("app {member} is not in the config's apps"),
                ));
            }
            if let Some(other) = member_of.insert(*member, i) {
                return Err(ConfigError::at(
                    at,
                    if other == i {
                        format!("app {member} is listed twice")
                    } else {
                        format!(
                            "app {member} is already a member of group {} ({list}[{other}]): an app is in one group at most",
                            groups[other].id
                        )
                    },
                ));
            }
        }
    }
    // Every group snapshot: its group, and which members list it.
    let mut listed: BTreeMap<Uuid, (usize, BTreeSet<Uuid>)> = BTreeMap::new();
    for (i, app) in config.apps.iter().enumerate() {
        for (j, desc) in app.snapshot.snapshots.iter().enumerate() {
            if desc.group_id.is_nil() {
                continue;
            }
            let at = format!("apps[{i}].snapshot.snapshots[{j}].group");
            let Some(&g) = member_of.get(&app.app_uuid()) else {
                return Err(ConfigError::at(
                    at,
                    format!(
                        "app {} lists group snapshot {} but is a member of no group (declare the group and its members in groups)",
                        app.app_uuid(),
                        desc.group_id
                    ),
                ));
            };
            let entry = listed.entry(desc.group_id).or_insert((g, BTreeSet::new()));
            if entry.0 != g {
                return Err(ConfigError::at(
                    at,
                    format!(
                        "group snapshot {} is listed by members of two groups ({} and {})",
                        desc.group_id, groups[entry.0].id, groups[g].id
                    ),
                ));
            }
            entry.1.insert(app.app_uuid());
        }
    }
    for (snapshot, (g, members)) in &listed {
        if let Some(missing) = groups[*g].members.iter().find(|m| !members.contains(m)) {
            return Err(ConfigError::at(
                format!("{list}[{g}].members"),
                format!(
                    "member app {missing} does not list group snapshot {snapshot}: every member lists its own snapshot of it"
                ),
            ));
        }
    }
    for (app, g) in member_of {
        config.apps[apps[&app]].group = Some(Box::new(groups[g].clone()));
    }
    Ok(())
}
