//! Container apps in the config: EVE's `virtualizationMode` NOHYPER (a container run from the
//! app's first volume, made from a CONTAINER content tree) and the local file's
//! `{"kind": "container"}` domain, both to a `ContainerSpec`.

use std::collections::BTreeMap;

use base64::Engine;
use cairn_types::{ContainerSpec, DomainSpec};

use crate::proto;

/// A NOHYPER app's domain from EVE's fields: `fixedresources.memory` (KiB, rounded up to MiB)
/// and `vcpus` as the container's limits, `userData` (base64) as its environment, one
/// `KEY=VALUE` per line, as EVE's domainmgr reads it for a container. `Err` is why Cairn cannot
/// run it (the app is accepted and reported with it).
pub fn eve_container(app: &proto::AppInstanceConfig) -> Result<DomainSpec, String> {
    if app.volume_ref_list.is_empty() {
        return Err(
            "fixedresources.virtualizationMode NOHYPER: volumeRefList is empty; the first volume is the container's image (a volume from a CONTAINER content tree)"
                .into(),
        );
    }
    let (memory_kib, vcpus) = app
        .fixedresources
        .as_ref()
        .map_or((0, 0), |vm| (vm.memory, vm.vcpus));
    Ok(DomainSpec::Container(ContainerSpec {
        memory_mib: memory_kib.div_ceil(1024),
        cpus: vcpus,
        env: user_data_env(&app.user_data)?,
    }))
}

/// EVE's environment for a container from its user data: base64 text, each non-empty line
/// `KEY=VALUE`. A `#cloud-config` document is not an environment (EVE applies parts of it to a
/// container; Cairn does not yet): refused by name.
pub fn user_data_env(user_data: &str) -> Result<BTreeMap<String, String>, String> {
    if user_data.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(user_data.trim())
        .map_err(|e| format!("userData is not base64: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| "userData is not UTF-8 text".to_string())?;
    if text.trim_start().starts_with("#cloud-config") {
        return Err(
            "userData is a #cloud-config document: Cairn gives a container its user data as KEY=VALUE lines (its environment) only"
                .into(),
        );
    }
    let mut env = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match line.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                env.insert(key.to_string(), value.to_string());
            }
            _ => {
                return Err(format!(
                    "userData line {}: {line:?} is not KEY=VALUE (a container's user data is its environment)",
                    i + 1
                ));
            }
        }
    }
    Ok(env)
}

/// Whether content tree `id` of the config is a container image.
pub fn is_container_tree(id: uuid::Uuid, trees: &[cairn_types::ContentTreeConfig]) -> bool {
    trees
        .iter()
        .any(|t| t.content_id == id && t.format == cairn_types::ContentFormat::Container)
}

/// A volume made from a container image is a directory (its root filesystem): any other
/// format is refused, naming the volume.
pub fn check_image_volume(
    volume: &cairn_types::VolumeConfig,
    trees: &[cairn_types::ContentTreeConfig],
    i: usize,
) -> Result<(), crate::model::ConfigError> {
    if let cairn_types::volume::VolumeOrigin::ContentTree { id } = volume.origin
        && is_container_tree(id, trees)
        && volume.format != cairn_types::VolumeFormat::Dir
    {
        return Err(crate::model::ConfigError {
            path: format!("volumes[{i}].format"),
            message: format!(
                "volume {} is made from content tree {id} (a container image): its format must be dir (the image's root filesystem)",
                volume.volume_id
            ),
        });
    }
    Ok(())
}

/// EVE's volumes have no format: one made from a container image is its root filesystem, a
/// directory (the controller's default, qcow2, names a disk image).
pub fn image_volumes_are_dirs(config: &mut crate::model::DeviceConfig) {
    let trees = config.content_trees.clone();
    for volume in &mut config.volumes {
        if let cairn_types::volume::VolumeOrigin::ContentTree { id } = volume.origin
            && is_container_tree(id, &trees)
        {
            volume.format = cairn_types::VolumeFormat::Dir;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn user_data_is_the_environment_and_a_bad_line_is_named() {
        let env = user_data_env(&b64("A=1\n\nB=x=y\n")).unwrap_or_default();
        assert_eq!(env.get("A").map(String::as_str), Some("1"));
        assert_eq!(env.get("B").map(String::as_str), Some("x=y"));
        let bad = user_data_env(&b64("A=1\nnot a pair\n")).unwrap_err();
        assert!(bad.contains("line 2"), "{bad}");
        let cloud = user_data_env(&b64("#cloud-config\nruncmd: []\n")).unwrap_err();
        assert!(cloud.contains("#cloud-config"), "{cloud}");
    }

    #[test]
    fn nohyper_is_a_container_with_eves_limits() {
        let app = proto::AppInstanceConfig {
            fixedresources: Some(proto::VmConfig {
                memory: 100_000,
                vcpus: 2,
                virtualization_mode: proto::VmMode::Nohyper as i32,
                ..Default::default()
            }),
            volume_ref_list: vec![Default::default()],
            user_data: b64("GREETING=hi"),
            ..Default::default()
        };
        let Ok(DomainSpec::Container(c)) = eve_container(&app) else {
            panic!("not a container: {:?}", eve_container(&app));
        };
        assert_eq!((c.memory_mib, c.cpus), (98, 2));
        assert_eq!(c.env.get("GREETING").map(String::as_str), Some("hi"));
        let none = proto::AppInstanceConfig {
            volume_ref_list: Vec::new(),
            ..app
        };
        assert!(eve_container(&none).is_err());
    }
}
