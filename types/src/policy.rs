//! Snapshot policies beyond EVE: a schedule in a time zone, expiry,
//! retention counts applied as Proxmox and sanoid do, and a naming pattern. Parsing lives here,
//! next to the types, so that the config-agent (which refuses a bad policy as a whole) and the
//! app-manager (which runs it) read a policy the same way. Pure: no I/O, no clock.

use std::str::FromStr;

use cairn_persist::Persist;
use chrono::{DateTime, Datelike, NaiveDateTime, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How many snapshots of each kind a retention keeps; 0 = that rule is off. Applied in field
/// order: the newest `keep_last`, then one per hour for the last `keep_hourly` hours that have a
/// snapshot, then days, ISO weeks, months and years likewise, never counting a period already
/// covered by a snapshot an earlier rule kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct Retention {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
}

impl Retention {
    pub fn is_set(&self) -> bool {
        *self != Self::default()
    }
}

/// An app's snapshot policy. All fields are optional; an empty policy changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct SnapshotPolicy {
    /// 5-field cron or `@hourly @daily @weekly @monthly @yearly`; empty = no schedule.
    pub schedule: String,
    /// IANA zone the schedule is read in (`Europe/Berlin`); empty = UTC.
    pub time_zone: String,
    /// Take scheduled snapshots while the app is deactivated too.
    pub schedule_when_stopped: bool,
    /// Scheduled snapshots older than this are deleted; 0 = never.
    pub expiry_seconds: u64,
    pub retention: Retention,
    /// Names of scheduled snapshots: strftime fields (`%Y%m%d-%H%M`, in the schedule's zone),
    /// `%n` a counter, `%a` the app's name. Empty = `auto-%Y%m%d-%H%M`.
    pub pattern: String,
    /// How scheduled snapshots are taken: stopped (default), live or stateful.
    pub mode: crate::snapshot::SnapshotMode,
    /// Each scheduled snapshot is exported to an object-store remote; none: no export.
    pub export: Option<ScheduledExport>,
}

/// Where and how scheduled snapshots are exported: incremental exports over the previous one,
/// a full one every `full_every`, and the newest `keep_exports` kept in the bucket (with the
/// exports they build on).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct ScheduledExport {
    /// The id of a configured remote.
    pub remote: String,
    /// Under the remote's prefix: where this app's exports go.
    pub prefix: String,
    /// A full export every this many exports, incremental ones between; 0 or 1: all full.
    pub full_every: u32,
    /// Exports kept in the bucket, newest first; 0: all.
    pub keep_exports: u32,
}

impl ScheduledExport {
    /// The export job of scheduled snapshot `snapshot`: the same id whoever asks and however
    /// often (a restart publishes it again).
    pub fn job_id(snapshot: Uuid) -> Uuid {
        Uuid::new_v5(&snapshot, b"cairn-scheduled-export")
    }
}

/// A consistency group: apps snapshotted together, all or none, at one logical
/// time. Declared once in the device's config; the config-agent hands each member a copy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, Persist)]
#[serde(default, rename_all = "PascalCase")]
pub struct ConsistencyGroup {
    #[serde(rename = "ID")]
    pub id: Uuid,
    pub name: String,
    /// The member apps' UUIDs. A group snapshot waits for every one of them.
    pub members: Vec<Uuid>,
    /// Scheduled group snapshots: every member takes its snapshot of each due time, under one
    /// group snapshot id derived from the group and the due time (`schedule_when_stopped` does
    /// not apply: a group takes every member, running or not).
    pub policy: Option<Box<SnapshotPolicy>>,
}

impl ConsistencyGroup {
    /// The group snapshot of due time `due`: the same id on every member, whichever clock
    /// reading its machine took it at.
    pub fn scheduled_snapshot(&self, due: DateTime<Utc>) -> Uuid {
        Uuid::new_v5(&self.id, due.to_rfc3339().as_bytes())
    }

    /// Member `app`'s own snapshot of group snapshot `group_snapshot`.
    pub fn member_snapshot(group_snapshot: Uuid, app: Uuid) -> Uuid {
        Uuid::new_v5(&group_snapshot, app.as_bytes())
    }
}

pub const DEFAULT_PATTERN: &str = "auto-%Y%m%d-%H%M";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("schedule {0:?}: {1}")]
    Schedule(String, String),
    #[error("time zone {0:?} is not an IANA zone name (like Europe/Berlin or UTC)")]
    TimeZone(String),
    #[error("duration {0:?}: {1}")]
    Duration(String, String),
    #[error("pattern {0:?}: {1}")]
    Pattern(String, String),
}

/// A parsed schedule in its zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: croner::Cron,
    zone: Tz,
}

impl Schedule {
    pub fn parse(expression: &str, zone: &str) -> Result<Self, PolicyError> {
        let zone = parse_zone(zone)?;
        let trimmed = expression.trim();
        let fields = trimmed.split_whitespace().count();
        if !trimmed.starts_with('@') && fields != 5 {
            return Err(PolicyError::Schedule(
                expression.into(),
                format!(
                    "a cron schedule has 5 fields (minute hour day month weekday), not {fields}"
                ),
            ));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .build()
            .parse(trimmed)
            .map_err(|e| PolicyError::Schedule(expression.into(), e.to_string()))?;
        Ok(Self { cron, zone })
    }

    pub fn zone(&self) -> Tz {
        self.zone
    }

    /// The first due time strictly after `after`. A wall-clock time a daylight-saving change
    /// skips is due just after the change; a fixed time of day that the change repeats is due
    /// once (croner's rules; the tests below hold it to them).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let from = after.with_timezone(&self.zone);
        let next = self.cron.find_next_occurrence(&from, false).ok()?;
        Some(next.with_timezone(&Utc)).filter(|next| *next > after)
    }
}

pub fn parse_zone(zone: &str) -> Result<Tz, PolicyError> {
    if zone.trim().is_empty() {
        return Ok(Tz::UTC);
    }
    Tz::from_str(zone.trim()).map_err(|_| PolicyError::TimeZone(zone.into()))
}

/// `90s`, `30m`, `12h`, `7d`, `2w`, or sums like `1d12h`; bare numbers are refused (unit-less
/// durations are how a "7" meant as days becomes seven seconds).
pub fn parse_duration(text: &str) -> Result<u64, PolicyError> {
    let bad = |why: &str| PolicyError::Duration(text.into(), why.into());
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(bad("empty"));
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in trimmed.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(bad("units are s, m, h, d and w (e.g. 7d, 2w, 12h)")),
        };
        let value: u64 = number
            .parse()
            .map_err(|_| bad("each unit needs a number before it"))?;
        number.clear();
        total = value
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| bad("too long"))?;
    }
    if !number.is_empty() {
        return Err(bad("a number without a unit (write 7d, 12h, …)"));
    }
    if total == 0 {
        return Err(bad("must be longer than zero"));
    }
    Ok(total)
}

/// Checks a naming pattern: known `%` fields only.
pub fn check_pattern(pattern: &str) -> Result<(), PolicyError> {
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            continue;
        }
        match chars.next() {
            Some('Y' | 'm' | 'd' | 'H' | 'M' | 'S' | 'j' | 'V' | 'n' | 'a' | '%') => {}
            Some(other) => {
                return Err(PolicyError::Pattern(
                    pattern.into(),
                    format!("unknown field %{other} (known: %Y %m %d %H %M %S %j %V %n %a %%)"),
                ));
            }
            None => {
                return Err(PolicyError::Pattern(
                    pattern.into(),
                    "ends with a lone %".into(),
                ));
            }
        }
    }
    Ok(())
}

/// The name of a scheduled snapshot taken at `at` (shown in `zone`).
pub fn snapshot_name(
    pattern: &str,
    at: DateTime<Utc>,
    zone: Tz,
    counter: u64,
    app: &str,
) -> String {
    let pattern = if pattern.is_empty() {
        DEFAULT_PATTERN
    } else {
        pattern
    };
    let local: NaiveDateTime = at.with_timezone(&zone).naive_local();
    let mut out = String::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&format!("{:04}", local.year())),
            Some('m') => out.push_str(&format!("{:02}", local.month())),
            Some('d') => out.push_str(&format!("{:02}", local.day())),
            Some('H') => out.push_str(&format!("{:02}", local.hour())),
            Some('M') => out.push_str(&format!("{:02}", local.minute())),
            Some('S') => out.push_str(&format!("{:02}", local.second())),
            Some('j') => out.push_str(&format!("{:03}", local.ordinal())),
            Some('V') => out.push_str(&format!("{:02}", local.iso_week().week())),
            Some('n') => out.push_str(&counter.to_string()),
            Some('a') => out.push_str(app),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Which of `snapshots` (`(id, time created)`) a retention keeps, reading periods in `zone`.
/// Proxmox's and sanoid's rules: newest first; `keep_last` keeps the newest N; each period rule
/// then keeps the newest snapshot of each of its last N periods that hold one, skipping periods
/// an earlier rule already covered. A retention with every count 0 keeps everything.
pub fn retained<Id: Ord + Copy>(
    snapshots: &[(Id, DateTime<Utc>)],
    retention: &Retention,
    zone: Tz,
) -> std::collections::BTreeSet<Id> {
    use std::collections::{BTreeSet, HashSet};
    let mut newest_first: Vec<(Id, DateTime<Utc>)> = snapshots.to_vec();
    newest_first.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    if !retention.is_set() {
        return newest_first.iter().map(|(id, _)| *id).collect();
    }
    let mut kept: BTreeSet<Id> = newest_first
        .iter()
        .take(retention.keep_last as usize)
        .map(|(id, _)| *id)
        .collect();
    type Period = fn(NaiveDateTime) -> (i32, u32, u32, u32);
    let rules: [(u32, Period); 5] = [
        (retention.keep_hourly, |t| {
            (t.year(), t.ordinal(), t.hour(), 0)
        }),
        (retention.keep_daily, |t| (t.year(), t.ordinal(), 0, 0)),
        (retention.keep_weekly, |t| {
            let w = t.iso_week();
            (w.year(), w.week(), 0, 0)
        }),
        (retention.keep_monthly, |t| (t.year(), t.month(), 0, 0)),
        (retention.keep_yearly, |t| (t.year(), 0, 0, 0)),
    ];
    for (count, period) in rules {
        if count == 0 {
            continue;
        }
        let local = |at: &DateTime<Utc>| at.with_timezone(&zone).naive_local();
        let covered: HashSet<_> = newest_first
            .iter()
            .filter(|(id, _)| kept.contains(id))
            .map(|(_, at)| period(local(at)))
            .collect();
        let mut chosen = HashSet::new();
        for (id, at) in &newest_first {
            if kept.contains(id) {
                continue;
            }
            let key = period(local(at));
            if covered.contains(&key) || chosen.contains(&key) {
                continue;
            }
            if chosen.len() >= count as usize {
                break;
            }
            chosen.insert(key);
            kept.insert(*id);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Every due time from `from` until `until`.
    fn dues(schedule: &Schedule, from: &str, until: &str) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut at = utc(from);
        while let Some(next) = schedule.next_after(at) {
            if next > utc(until) {
                break;
            }
            out.push(next);
            at = next;
        }
        out
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d").unwrap(), 7 * 86_400);
        assert_eq!(parse_duration("2w").unwrap(), 14 * 86_400);
        assert_eq!(parse_duration("12h").unwrap(), 43_200);
        assert_eq!(parse_duration("1d12h").unwrap(), 129_600);
        for bad in ["", "7", "7x", "d", "0h", "99999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn schedules_parse_and_refuse() {
        for good in [
            "0 3 * * *",
            "*/15 * * * *",
            "@hourly",
            "@daily",
            "@weekly",
            "@monthly",
            "@yearly",
            "30 2 * * 1-5",
        ] {
            Schedule::parse(good, "Europe/Berlin").unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "0 3 * *",
            "0 0 3 * * *",
            "61 * * * *",
            "@fortnightly",
            "banana",
        ] {
            assert!(Schedule::parse(bad, "UTC").is_err(), "{bad:?} is refused");
        }
        assert!(matches!(
            Schedule::parse("@daily", "Mars/Olympus"),
            Err(PolicyError::TimeZone(_))
        ));
    }

    #[test]
    fn a_daily_schedule_in_a_zone_is_due_at_local_time() {
        let s = Schedule::parse("0 3 * * *", "Europe/Berlin").unwrap();
        // Winter: 03:00 CET = 02:00 UTC.
        assert_eq!(
            s.next_after(utc("2026-01-10T12:00:00Z")),
            Some(utc("2026-01-11T02:00:00Z"))
        );
        // Summer: 03:00 CEST = 01:00 UTC.
        assert_eq!(
            s.next_after(utc("2026-07-10T12:00:00Z")),
            Some(utc("2026-07-11T01:00:00Z"))
        );
    }

    #[test]
    fn spring_forward_neither_skips_nor_doubles_a_day() {
        // 2026-03-29 in Berlin: 02:00 → 03:00. 02:30 does not exist that day.
        let s = Schedule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        let got = dues(&s, "2026-03-27T12:00:00Z", "2026-03-31T12:00:00Z");
        let days: Vec<u32> = got
            .iter()
            .map(|t| t.with_timezone(&Tz::Europe__Berlin).day())
            .collect();
        assert_eq!(days, [28, 29, 30, 31], "one per day: {got:?}");
    }

    #[test]
    fn fall_back_takes_a_repeated_time_once() {
        // 2026-10-25 in Berlin: 03:00 → 02:00. 02:30 happens twice that night.
        let s = Schedule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        let got = dues(&s, "2026-10-23T12:00:00Z", "2026-10-27T12:00:00Z");
        let days: Vec<u32> = got
            .iter()
            .map(|t| t.with_timezone(&Tz::Europe__Berlin).day())
            .collect();
        assert_eq!(days, [24, 25, 26, 27], "one per day: {got:?}");
        // An hourly schedule does run in both passes of the repeated hour: they are two hours.
        let hourly = Schedule::parse("0 * * * *", "Europe/Berlin").unwrap();
        let night = dues(&hourly, "2026-10-24T22:30:00Z", "2026-10-25T03:30:00Z");
        assert_eq!(night.len(), 5, "{night:?}");
        let distinct: std::collections::BTreeSet<_> = night.iter().collect();
        assert_eq!(distinct.len(), night.len());
    }

    /// Hourly snapshots over `days` days ending at `end`, ids 0 (oldest) upwards.
    fn hourly(end: &str, hours: u32) -> Vec<(u32, DateTime<Utc>)> {
        let end = utc(end);
        (0..hours)
            .map(|i| (i, end - chrono::Duration::hours((hours - 1 - i) as i64)))
            .collect()
    }

    #[test]
    fn retention_keeps_last_then_one_per_period() {
        let snaps = hourly("2026-07-10T23:00:00Z", 24 * 10); // ten days, every hour
        let keep = |r: Retention| retained(&snaps, &r, Tz::UTC);
        let newest = snaps.len() as u32 - 1;

        let last = keep(Retention {
            keep_last: 3,
            ..Default::default()
        });
        assert_eq!(last, [newest - 2, newest - 1, newest].into());

        // keep_daily 3: the newest of each of the last three days.
        let daily = keep(Retention {
            keep_daily: 3,
            ..Default::default()
        });
        assert_eq!(daily, [newest - 48, newest - 24, newest].into());

        // keep_last 2 covers today already: keep_daily 2 then adds yesterday and the day before.
        let both = keep(Retention {
            keep_last: 2,
            keep_daily: 2,
            ..Default::default()
        });
        assert_eq!(both, [newest - 48, newest - 24, newest - 1, newest].into());

        // Periods without a snapshot do not count: a gap of days is skipped over.
        let sparse: Vec<(u32, DateTime<Utc>)> = [
            (1, "2026-01-01T10:00:00Z"),
            (2, "2026-01-05T10:00:00Z"),
            (3, "2026-01-05T11:00:00Z"),
        ]
        .iter()
        .map(|(id, t)| (*id, utc(t)))
        .collect();
        let r = Retention {
            keep_daily: 2,
            ..Default::default()
        };
        assert_eq!(retained(&sparse, &r, Tz::UTC), [1, 3].into());

        // Nothing set: everything stays.
        assert_eq!(keep(Retention::default()).len(), snaps.len());
    }

    /// Thirty daily snapshots (noon UTC, 1–30 June 2026; 1 June is a Monday, ISO week 23) with
    /// keep-daily 7 + keep-weekly 4. Daily keeps 24–30 June, which cover ISO weeks 26 (22–28)
    /// and 27 (29–30). Weekly then walks back from 23 June: 23 and 22 are in week 26, already
    /// covered; 21 June (Sunday) is the newest of week 25, 14 June of week 24, 7 June of week 23;
    /// no older week has a snapshot, so weekly keeps three, not four. Ten in all.
    #[test]
    fn retention_thirty_dailies_keep_daily_7_keep_weekly_4() {
        let snaps: Vec<(u32, DateTime<Utc>)> = (1..=30)
            .map(|day| (day, utc(&format!("2026-06-{day:02}T12:00:00Z"))))
            .collect();
        let r = Retention {
            keep_daily: 7,
            keep_weekly: 4,
            ..Default::default()
        };
        assert_eq!(
            retained(&snaps, &r, Tz::UTC),
            [7, 14, 21, 24, 25, 26, 27, 28, 29, 30].into()
        );
        // keep-last 3 + keep-monthly 2 over the same month: 28–30, then May has none, so June
        // is covered already and monthly adds nothing.
        let r = Retention {
            keep_last: 3,
            keep_monthly: 2,
            ..Default::default()
        };
        assert_eq!(retained(&snaps, &r, Tz::UTC), [28, 29, 30].into());
        // keep-weekly 2 alone: the newest of weeks 27 and 26.
        let r = Retention {
            keep_weekly: 2,
            ..Default::default()
        };
        assert_eq!(retained(&snaps, &r, Tz::UTC), [28, 30].into());
    }

    #[test]
    fn retention_periods_are_read_in_the_zone() {
        // 21:00 and 23:30 UTC on 1 July: one UTC day, but 23:00 on 1 July and 01:30 on 2 July
        // in Berlin, two days there.
        let snaps = [
            (1, utc("2026-07-01T21:00:00Z")),
            (2, utc("2026-07-01T23:30:00Z")),
        ];
        let r = Retention {
            keep_daily: 5,
            ..Default::default()
        };
        assert_eq!(retained(&snaps, &r, Tz::UTC), [2].into());
        assert_eq!(retained(&snaps, &r, Tz::Europe__Berlin), [1, 2].into());
        let r = Retention {
            keep_daily: 1,
            ..Default::default()
        };
        assert_eq!(retained(&snaps, &r, Tz::Europe__Berlin), [2].into());
    }

    #[test]
    fn names_follow_the_pattern_in_the_schedules_zone() {
        let at = Utc.with_ymd_and_hms(2026, 7, 1, 22, 5, 0).unwrap();
        assert_eq!(
            snapshot_name("", at, Tz::Europe__Berlin, 7, "sensor"),
            "auto-20260702-0005"
        );
        assert_eq!(
            snapshot_name("%a-%n-%%", at, Tz::UTC, 7, "sensor"),
            "sensor-7-%"
        );
        check_pattern("auto-%Y%m%d-%H%M-%n").unwrap();
        assert!(check_pattern("x-%q").is_err());
        assert!(check_pattern("x-%").is_err());
    }
}
