//! `cairn up --dbus ADDRESS`: the device's read-only D-Bus read-out.
//!
//! `cairn up` serves, next to the agents it supervises, the gateways of `cairn_dbus` on
//! the D-Bus bus at ADDRESS: `org.cairn.Bus` mirrors the status every agent publishes
//! (`DeviceStatus`, `AppInstanceStatus`, `VolumeStatus`, `DomainStatus`), and each tenant given
//! with `--tenant-reader TENANT:GID` gets its own name, `org.cairn.Tenant.<tenant>`, that mirrors
//! only that tenant's apps and the device-wide status. Who may talk to which name is the D-Bus
//! daemon's policy: `cairn dbus-policy` prints it for `/etc/dbus-1/system.d/`.
//!
//! A bus that cannot be reached is no reason to stop the device: the read-out says why on
//! stderr and tries again with backoff, while the agents run on. A connection lost later (the
//! daemon restarted) is made again the same way.

use std::time::Duration;

use cairn_dbus::{Gateway, tenant_bus_name, tenant_policy};
use cairn_types::{AppInstanceStatus, DeviceStatus, DomainStatus, VolumeStatus};
use tokio::sync::watch;

use crate::readout::Roots;

/// The general gateway's bus name.
pub const BUS_NAME: &str = "org.cairn.Bus";

const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Serves the gateways until `stopping` turns true.
pub async fn serve(
    address: String,
    roots: Roots,
    tenants: Vec<String>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut retry = FIRST_RETRY;
    loop {
        match connect(&address, &roots, &tenants).await {
            Ok(gateways) => {
                eprintln!(
                    "cairn up: D-Bus read-out on {address}: {BUS_NAME}{}",
                    tenants
                        .iter()
                        .map(|t| format!(", {}", tenant_bus_name(t)))
                        .collect::<String>()
                );
                retry = FIRST_RETRY;
                // All gateways are connections to the one daemon: the general one stands for
                // them.
                let lost = gateways[0].closed();
                tokio::select! {
                    // Dropping the gateways releases their names.
                    _ = stopping.wait_for(|stop| *stop) => return,
                    () = lost => {
                        eprintln!("cairn up: D-Bus read-out on {address}: connection lost; connecting again");
                    }
                }
                drop(gateways);
            }
            Err(e) => {
                eprintln!(
                    "cairn up: D-Bus read-out on {address} unavailable: {e:#}; trying again in {} s",
                    retry.as_secs()
                );
                tokio::select! {
                    _ = stopping.wait_for(|stop| *stop) => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// The general gateway and one per tenant, each mirroring its topics.
async fn connect(address: &str, roots: &Roots, tenants: &[String]) -> anyhow::Result<Vec<Gateway>> {
    let bus = roots.bus();
    let mut general = Gateway::connect(address, BUS_NAME).await?;
    general.mirror(bus.subscribe::<DeviceStatus>("config-agent"))?;
    general.mirror(bus.subscribe::<AppInstanceStatus>("app-manager"))?;
    general.mirror(bus.subscribe::<VolumeStatus>("volume-manager"))?;
    general.mirror(bus.subscribe::<DomainStatus>("domain-manager"))?;
    let mut gateways = vec![general];
    for tenant in tenants {
        let mut gateway = Gateway::connect(address, &tenant_bus_name(tenant)).await?;
        gateway.mirror_tenant(bus.subscribe::<DeviceStatus>("config-agent"), tenant)?;
        gateway.mirror_tenant(bus.subscribe::<AppInstanceStatus>("app-manager"), tenant)?;
        gateways.push(gateway);
    }
    Ok(gateways)
}

/// `cairn dbus-policy`: the `<busconfig>` that lets the technicians' group read every gateway
/// and each tenant's group only its tenant's. Groups are given by id, as to `cairn up`, and
/// written by name, as dbus-daemon wants them.
pub fn policy(
    technicians_gid: Option<u32>,
    tenant_readers: &[(String, u32)],
) -> anyhow::Result<String> {
    let general = technicians_gid.map(group_name).transpose()?;
    let tenants: Vec<(String, String)> = tenant_readers
        .iter()
        .map(|(tenant, gid)| Ok((tenant.clone(), group_name(*gid)?)))
        .collect::<anyhow::Result<_>>()?;
    let pairs: Vec<(&str, &str)> = tenants
        .iter()
        .map(|(t, g)| (t.as_str(), g.as_str()))
        .collect();
    Ok(tenant_policy(general.as_deref(), &pairs))
}

fn group_name(gid: u32) -> anyhow::Result<String> {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(group)) => Ok(group.name),
        Ok(None) => anyhow::bail!(
            "group {gid} is not in the group database: dbus-daemon admits groups by name, so create it first (groupadd)"
        ),
        Err(e) => anyhow::bail!("looking up group {gid}: {e}"),
    }
}
