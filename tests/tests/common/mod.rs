//! What the tests of a stock EVE controller's config share (`eve_apps.rs`, `containers.rs`):
//! a device following the test controller, and an app described by EVE's fields only.
// Each test file uses a part of it.
#![allow(dead_code)]

use cairn_config_agent::proto::{
    AppInstanceConfig as ProtoApp, EdgeDevConfig, UuidAndVersion, VmConfig, VolumeRef,
};
use cairn_e2e::Device;
use cairn_test_controller::TestController;

/// A device whose config-agent follows `controller` as `serial`, the controller serving
/// `config`; all agents started.
pub async fn follow(controller: &TestController, serial: &str, config: EdgeDevConfig) -> Device {
    let mut device = Device::new();
    start_following(&mut device, controller, serial, config);
    device
}

/// [`follow`] for a device made already (its root holds what the test set up).
pub fn start_following(
    device: &mut Device,
    controller: &TestController,
    serial: &str,
    config: EdgeDevConfig,
) {
    let mut args = controller
        .device_args(&device.root.path().join("setup"), serial)
        .unwrap();
    // Quick config, retry and metric intervals.
    args.extend(
        [
            "--config-interval-ms",
            "200",
            "--retry-ms",
            "100",
            "--metric-interval-ms",
            "500",
        ]
        .map(String::from),
    );
    device.follow_controller(args);
    controller.set_config(serial, config);
    device.start_all();
}

/// App `uuid` (version 1, activated) as EVE's controller describes it: `fixedresources` and
/// its volumes by id, nothing else.
pub fn eve_app(uuid: &str, name: &str, resources: VmConfig, volumes: &[&str]) -> ProtoApp {
    ProtoApp {
        uuidandversion: Some(UuidAndVersion {
            uuid: uuid.into(),
            version: "1".into(),
        }),
        displayname: name.into(),
        activate: true,
        fixedresources: Some(resources),
        volume_ref_list: volumes
            .iter()
            .map(|v| VolumeRef {
                uuid: (*v).into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}
