//! The HTML page: the read-out model rendered with maud (compiled templates, escaped by
//! construction). States carry a colour and always their name; times are shown relative
//! ("3 min ago") with the device's local time as the tooltip.

use cairn_readout::problems::{About, Problem};
use cairn_readout::readout::{DeviceView, SnapshotRow, app_volumes};
use cairn_types::export::{ExportState, ExportStatus};
use cairn_types::{AppInstanceStatus, SwState, VolumeStatus};
use chrono::{DateTime, Local, NaiveDateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::{Disk, Scope};

/// Mobile-first: one column on a phone; tables scroll sideways inside their card.
const STYLE: &str = r#"
*{box-sizing:border-box}
body{margin:0;font:15px/1.4 system-ui,sans-serif;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 14px;display:flex;flex-wrap:wrap;gap:6px 16px;align-items:baseline}
header h1{font-size:18px;margin:0}
header small{opacity:.8}
main{padding:10px;max-width:1400px;margin:auto;display:grid;gap:10px;grid-template-columns:1fr}
@media(min-width:900px){main{grid-template-columns:1fr 1fr}}
section{background:#fff;border-radius:6px;padding:10px 12px;box-shadow:0 1px 2px #0002;min-width:0}
section.wide{grid-column:1/-1}
h2{font-size:16px;margin:0 0 6px}
h3{font-size:14px;margin:10px 0 4px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 10px;margin:0}
dt{color:#555}dd{margin:0;overflow-wrap:anywhere}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #e3e5e8;white-space:nowrap}
td.why{white-space:normal;min-width:12em}
.st{display:inline-block;padding:0 6px;border-radius:9px;font-size:13px;font-weight:600;border:1px solid}
.ok{background:#e3f6e8;color:#116329;border-color:#116329}
.warn{background:#fff4d6;color:#7a4d00;border-color:#7a4d00}
.bad{background:#fde7e9;color:#a0111f;border-color:#a0111f}
.idle{background:#eceef1;color:#444;border-color:#666}
.err{color:#a0111f;margin:4px 0}
.note{color:#555;font-size:13px}
#live{font-size:13px}
ul.problems{list-style:none;padding:0;margin:4px 0}
li.problem{border-left:3px solid #a0111f;padding:2px 8px;margin:4px 0}
.todo{font-size:14px;margin-top:2px}
"#;

/// Relative times and live updates: no build step, no library.
const SCRIPT: &str = r#"
function rel(){const now=Date.now();document.querySelectorAll('time[datetime]').forEach(t=>{const s=Math.round((now-Date.parse(t.getAttribute('datetime')))/1000);const a=Math.abs(s);const v=a<60?a+' s':a<3600?Math.round(a/60)+' min':a<86400?Math.round(a/3600)+' h':Math.round(a/86400)+' d';t.textContent=s>=0?v+' ago':'in '+v;});}
const base=location.origin+'/';let busy=false,again=false;
async function refresh(){if(busy){again=true;return;}busy=true;try{const r=await fetch(base+'content',{cache:'no-store'});if(r.ok){document.getElementById('content').innerHTML=await r.text();rel();}}finally{busy=false;if(again){again=false;refresh();}}}
const live=document.getElementById('live');
const es=new EventSource(base+'api/v1/events');
es.addEventListener('change',refresh);
es.onopen=()=>{live.textContent='live';live.className='st ok';};
es.onerror=()=>{live.textContent='reconnecting';live.className='st warn';};
rel();setInterval(rel,30000);
"#;

/// The name a technician knows the device by: the config's, else its host name.
fn device_name(view: &DeviceView) -> Option<&str> {
    let d = view.device.as_ref()?;
    [d.device_name.as_str(), d.host_name.as_str()]
        .into_iter()
        .find(|n| !n.is_empty())
}

pub fn page(view: &DeviceView, rows: &[SnapshotRow], scope: &Scope, disk: Option<Disk>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Cairn device" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    h1 { "Cairn device" @if let Some(name) = device_name(view) { " " span #device-name { (name) } } }
                    small { "read-only · showing " (scope.describe()) }
                    span #live .st.idle { "connecting" }
                }
                div #content { (content(view, rows, scope, disk)) }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    }
}

/// What the live update replaces.
pub fn content(
    view: &DeviceView,
    rows: &[SnapshotRow],
    scope: &Scope,
    disk: Option<Disk>,
) -> Markup {
    html! {
        main {
            (device(view, disk))
            (agents(view))
            @let device_problems: Vec<&Problem> = view.problems.iter().filter(|p| p.app.is_empty()).collect();
            @if !device_problems.is_empty() {
                section.wide #problems {
                    h2 { "Last errors" }
                    (problem_list(&device_problems))
                }
            }
            @if view.apps.is_empty() {
                section.wide { h2 { "Apps" } p.note { "No apps " (match scope { Scope::Device => "on this device".to_string(), s => format!("of {}", s.describe()) }) "." } }
            }
            @for app in &view.apps {
                (app_card(view, app, rows))
            }
            @let loose: Vec<&VolumeStatus> = view.volumes.iter().filter(|v| !view.apps.iter().any(|a| app_volumes(view, a).iter().any(|u| u.key() == v.key()))).collect();
            @if !loose.is_empty() {
                section.wide #volumes {
                    h2 { "Volumes of no app" }
                    p.note { "Volumes no app shown here uses: pending deletion, or not referenced by any app." }
                    (volume_table(&loose))
                }
            }
            @let strays: Vec<&SnapshotRow> = rows.iter().filter(|r| r.app.is_empty()).collect();
            @if !strays.is_empty() {
                section.wide {
                    h2 { "Snapshot records of no app" }
                    (snapshot_table(&strays))
                }
            }
            @let orphans: Vec<&ExportStatus> = view.exports.iter().filter(|j| !view.apps.iter().any(|a| a.uuid_and_version.uuid == j.app_uuid)).collect();
            @if !orphans.is_empty() {
                section.wide #exports {
                    h2 { "Export jobs of no app shown here" }
                    p.note { "Verify jobs, and jobs refused before their snapshot was found." }
                    (export_table(&orphans))
                }
            }
        }
    }
}

fn badge(class: &str, text: &str) -> Markup {
    html! { span class={"st " (class)} { (text) } }
}

/// The device's local time, for the tooltip; the text is relative, filled in by the script
/// and rendered once here for pages read without it.
fn when(t: Option<DateTime<Utc>>) -> Markup {
    match t {
        None => html! { "never" },
        Some(t) => {
            let local = t
                .with_timezone(&Local)
                .format("%Y-%m-%d %H:%M:%S %Z")
                .to_string();
            html! { time datetime=(t.to_rfc3339()) title=(local) { (relative(t, Utc::now())) } }
        }
    }
}

/// A row's time (`%Y-%m-%d %H:%M:%S`, UTC, as the CLI prints it).
fn when_text(t: Option<&str>) -> Markup {
    let parsed = t.and_then(|t| NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S").ok());
    match (t, parsed) {
        (_, Some(naive)) => when(Some(naive.and_utc())),
        (Some(text), None) => html! { (text) },
        (None, None) => html! { "-" },
    }
}

pub fn relative(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - t).num_seconds();
    let a = s.unsigned_abs();
    let v = match a {
        0..60 => format!("{a} s"),
        60..3600 => format!("{} min", (a + 30) / 60),
        3600..86400 => format!("{} h", (a + 1800) / 3600),
        _ => format!("{} d", (a + 43200) / 86400),
    };
    if s >= 0 {
        format!("{v} ago")
    } else {
        format!("in {v}")
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn device(view: &DeviceView, disk: Option<Disk>) -> Markup {
    html! {
        section #device {
            h2 { "Device" }
            @match &view.device {
                None => p.err { "The config-agent does not answer: the device's config and controller link are unknown." },
                Some(d) => dl {
                    dt { "Name" } dd #name {
                        @if !d.device_name.is_empty() { (d.device_name) } @else { span.note { "none in the config" } }
                        @if !d.host_name.is_empty() { " · host " (d.host_name) }
                    }
                    dt { "Serial" } dd #serial {
                        @if d.serial.is_empty() { span.note { "unknown (none given at onboarding, none in the firmware)" } } @else { code { (d.serial) } }
                        @if !d.product_serial.is_empty() && d.product_serial != d.serial { " · machine " code { (d.product_serial) } }
                    }
                    dt { "UUID" } dd { @if d.device_uuid.is_empty() { "not onboarded" } @else { (d.device_uuid) } }
                    dt { "Controller" } dd {
                        @if d.controller_reachable { (badge("ok", "reachable")) }
                        @else if matches!(d.config_source, cairn_types::device::ConfigSource::LocalFile { .. }) { (badge("idle", "not used: local config")) }
                        @else { (badge("bad", "not reachable")) }
                        " last contact " (when(d.last_contact))
                    }
                    dt { "Config" } dd { (cairn_readout::readout::config_source_text(&d.config_source)) }
                    dt { "In force" } dd {
                        @if d.last_config_hash.is_empty() { "none yet" } @else {
                            code { (d.last_config_hash.get(..12).unwrap_or(&d.last_config_hash)) }
                        }
                        " applied " (when(d.last_config_time)) " · " (d.apps) " apps · " (d.volumes) " volumes"
                    }
                    @if d.reports_pending > 0 { dt { "Reports" } dd { (d.reports_pending) " waiting for the controller" } }
                    @if let Some(counter) = d.shutdown_cmd {
                        dt { "Shutdown" } dd { (badge("warn", "apps stopped")) " by the controller's shutdown command " (counter) ", until the next boot" }
                    }
                },
            }
            dl {
                dt { "Persist" } dd { (view.persist_dir)
                    @if let Some(disk) = disk {
                        " · " (bytes(disk.free)) " free of " (bytes(disk.total)) " "
                        @if disk.total > 0 && disk.free * 10 < disk.total { (badge("bad", "disk almost full")) }
                    }
                    @if let Some(fault) = &view.persist_fault {
                        " " (badge("bad", if fault.starts_with("read-only") { "read-only" } else { "full" })) " " span.err #persist-fault { (fault) }
                    }
                }
            }
        }
    }
}

fn agents(view: &DeviceView) -> Markup {
    html! {
        section #agents {
            h2 { "Agents" }
            table {
                @for a in &view.agents {
                    tr {
                        td { (a.agent) }
                        td.why {
                            @let class = if a.state == "up" { "ok" } else if a.state.starts_with("up") { "warn" } else { "bad" };
                            (badge(class, a.state.split(':').next().unwrap_or(&a.state)))
                            @if let Some((_, why)) = a.state.split_once(':') { " " span.note { (why.trim()) } }
                        }
                    }
                }
            }
        }
    }
}

pub fn app_state_class(state: SwState) -> &'static str {
    match state {
        SwState::Running => "ok",
        SwState::Broken | SwState::Failed | SwState::Unknown => "bad",
        SwState::Halted | SwState::Initial => "idle",
        _ => "warn",
    }
}

fn row_class(state: &str) -> &'static str {
    match state {
        "available" => "ok",
        "failed" | "corrupt" => "bad",
        _ => "warn",
    }
}

fn app_card(view: &DeviceView, app: &AppInstanceStatus, rows: &[SnapshotRow]) -> Markup {
    let uuid = app.uuid_and_version.uuid.to_string();
    let domain = view
        .domains
        .iter()
        .find(|d| d.uuid_and_version.uuid == app.uuid_and_version.uuid);
    let snapshots: Vec<&SnapshotRow> = rows.iter().filter(|r| r.app == uuid).collect();
    html! {
        section.wide.app data-app=(app.display_name) {
            h2 { (app.display_name) " " (badge(app_state_class(app.state), app.state.name())) }
            dl {
                dt { "UUID" } dd { code { (uuid) } " version " (app.uuid_and_version.version) }
                @if !app.tenant.is_empty() { dt { "Tenant" } dd { (app.tenant) } }
                dt { "Runs as" } dd.kind {
                    @match app.domain_kind.as_str() {
                        "" => span.note { "nothing: it cannot run as configured" },
                        "vm" => "VM",
                        kind => (kind),
                    }
                    @if !app.virtualization_mode.is_empty() { " · EVE mode " code { (app.virtualization_mode) } }
                }
                @if let Some(d) = domain {
                    dt { "Domain" } dd { (format!("{:?}", d.state)) @if !d.accel.is_empty() { " · " (d.accel) } " · booted " (when(d.boot_time)) }
                }
                @if app.restarts > 0 { dt { "Restarts" } dd { (app.restarts) } }
                @if app.snap_status.rollback_in_progress { dt { "Rollback" } dd { (badge("warn", "in progress")) } }
            }
            @let problems: Vec<&Problem> = view.problems.iter().filter(|p| p.app == uuid).collect();
            @if !problems.is_empty() {
                h3 { "Last errors (" (problems.len()) ")" }
                (problem_list(&problems))
            }
            @let volumes = app_volumes(view, app);
            h3 { "Volumes (" (volumes.len()) ")" }
            @if volumes.is_empty() { p.note { @if app.volume_refs.is_empty() { "none" } @else { (app.volume_refs.len()) " in its config, none reported by the volume-manager yet" } } } @else { (volume_table(&volumes)) }
            h3 { "Snapshots (" (snapshots.len()) ")" }
            @if snapshots.is_empty() { p.note { "none" } } @else { (snapshot_table(&snapshots)) }
            @let exports: Vec<&ExportStatus> = view.exports.iter().filter(|j| j.app_uuid == app.uuid_and_version.uuid).collect();
            @if !exports.is_empty() {
                h3 { "Exports (" (exports.len()) ")" }
                (export_table(&exports))
            }
        }
    }
}

fn export_table(jobs: &[&ExportStatus]) -> Markup {
    html! {
        div.scroll {
            table.exports {
                thead { tr { th { "State" } th { "Job" } th { "Snapshot" } th { "Progress" } th { "Where" } th { "Why" } } }
                tbody {
                    @for j in jobs {
                        @let state = format!("{:?}", j.state).to_lowercase();
                        tr data-export=(j.job_id) {
                            td { (badge(export_class(j.state), &state)) }
                            td { (format!("{:?}", j.action).to_lowercase()) " " code title=(j.job_id) { (j.job_id.to_string().get(..8).unwrap_or_default()) } }
                            td { code title=(j.snapshot_id) { (j.snapshot_id.to_string().get(..8).unwrap_or_default()) } }
                            td {
                                @if j.bytes_total > 0 {
                                    progress max=(j.bytes_total) value=(j.bytes_done) {}
                                    " " (j.bytes_done * 100 / j.bytes_total) " % of " (bytes(j.bytes_total))
                                } @else { "-" }
                            }
                            td.why { @if !j.export_dir.as_os_str().is_empty() { code { (j.export_dir.display()) } } }
                            td.why { @if !j.error.is_empty() { span.err { (j.error) } } @if j.fell_back_to_full { " " span.note { "incremental became full" } } }
                        }
                    }
                }
            }
        }
    }
}

fn export_class(state: ExportState) -> &'static str {
    match state {
        ExportState::Done => "ok",
        ExportState::Running => "warn",
        ExportState::Failed | ExportState::Cancelled => "bad",
    }
}

fn snapshot_table(rows: &[&SnapshotRow]) -> Markup {
    html! {
        div.scroll {
            table.snapshots {
                thead { tr { th { "State" } th { "Snapshot" } th { "Type" } th { "Mode" } th { "Config" } th { "Created" } th { "Expires" } th { "Pause" } th { "Why" } } }
                tbody {
                    @for r in rows {
                        tr data-snapshot=(r.id) {
                            td { (badge(row_class(&r.state), &r.state)) }
                            td { @if !r.name.is_empty() { (r.name) " " } code title=(r.id) { (r.id.get(..8).unwrap_or(&r.id)) } }
                            td { (r.kind) }
                            td { (r.mode) }
                            td { (r.config_version) }
                            td { (when_text(r.time_created.as_deref().or(r.time_triggered.as_deref()))) }
                            td { (when_text(r.expires.as_deref())) }
                            td { @if r.pause_ms > 0 { (r.pause_ms) " ms" } @else { "-" } }
                            td.why { @if !r.note.is_empty() { span.note { (r.note) } " " } @if !r.error.is_empty() { span.err { (r.error) } } }
                        }
                    }
                }
            }
        }
    }
}

fn volume_table(volumes: &[&VolumeStatus]) -> Markup {
    html! {
        div.scroll { table.volumes {
            thead { tr { th { "Volume" } th { "State" } th { "Backend" } th { "Size" } th { "Note" } } }
            tbody {
                @for v in volumes {
                    tr data-volume=(v.volume_id) {
                        td { (v.display_name) }
                        td { (badge(if v.error.is_error() { "bad" } else { "ok" }, &format!("{:?}", v.state))) }
                        td.why { (format!("{:?}", v.backend)) @if !v.backend_reason.is_empty() { " " span.note { (v.backend_reason) } } }
                        td { (bytes(v.current_size)) @if v.max_vol_size > 0 { " of " (bytes(v.max_vol_size)) } }
                        td.why {
                            @if v.error.is_error() { span.err { (v.error.error) } }
                            @if let Some(p) = &v.pending_deletion { (badge("warn", "pending deletion")) " " (p.reason) " · deleted " (when(p.delete_at)) }
                        }
                    }
                }
            }
        } }
    }
}

/// Errors with their time and what to do, newest first where times are known.
fn problem_list(problems: &[&Problem]) -> Markup {
    html! {
        ul.problems {
            @for p in problems {
                li.problem data-about=(about_name(p.about)) {
                    (badge("bad", "error")) " " strong { (p.object) } @if p.time.is_some() { " · " (when(p.time)) }
                    div.err { (p.error) }
                    div.todo { strong { "What to do: " } (p.what_to_do) }
                }
            }
        }
    }
}

fn about_name(about: About) -> &'static str {
    match about {
        About::Device => "device",
        About::Persist => "persist",
        About::App => "app",
        About::Snapshot => "snapshot",
        About::Volume => "volume",
        About::Download => "download",
        About::Export => "export",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_read_like_a_person_says_them() {
        let now = Utc::now();
        assert_eq!(relative(now - chrono::Duration::seconds(5), now), "5 s ago");
        assert_eq!(
            relative(now - chrono::Duration::seconds(180), now),
            "3 min ago"
        );
        assert_eq!(relative(now + chrono::Duration::hours(2), now), "in 2 h");
    }
}
