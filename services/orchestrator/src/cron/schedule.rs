//! Cron expressions read in an IANA time zone: validation, the next fire time, and what a tick
//! does with the firings that are due. Pure functions of their inputs, `now` included.
//!
//! Daylight saving time follows the Open Cron Pattern Specification, as the `croner` crate
//! implements it:
//! - a fixed-time job (one second, minute and hour, e.g. `30 2 * * *`) whose wall-clock time
//!   does not exist that day (clocks spring forward) fires once, at the first instant after the
//!   gap; when its wall-clock time happens twice (clocks fall back) it fires once, the first
//!   time;
//! - an interval job (`*/15 * * * *`, `0 * * * *`) fires at every real instant whose wall-clock
//!   time matches: nothing in the skipped hour, both passes through the repeated hour.

use std::str::FromStr as _;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Serialize};

/// Longest accepted cron expression and time zone name.
pub const MAX_EXPR_LEN: usize = 120;

/// Late firings counted one by one before a tick stops counting (a minutely schedule after a
/// week-long outage); the count is then a lower bound.
pub const MAX_COUNTED_MISSES: u32 = 10_000;

/// Why a cron expression or time zone was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("cron {expr:?} is not a valid five-field cron expression: {reason}")]
    Cron { expr: String, reason: String },
    #[error("cron {0:?} never fires")]
    Never(String),
    #[error("timezone {0:?} is not an IANA time zone name such as \"Europe/Paris\"")]
    Zone(String),
}

impl SpecError {
    /// Label for the rejected-requests metric.
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::Cron { .. } | SpecError::Never(_) => "invalid_cron",
            SpecError::Zone(_) => "invalid_timezone",
        }
    }
}

/// A validated schedule expression: five cron fields (minute, hour, day of month, month, day of
/// week; or an `@daily`-style nickname) read as wall-clock time in `zone`.
#[derive(Debug, Clone)]
pub struct CronSpec {
    cron: Cron,
    zone: Tz,
}

impl CronSpec {
    pub fn parse(expr: &str, zone: &str) -> Result<Self, SpecError> {
        let zone = parse_zone(zone)?;
        let invalid = |reason: String| SpecError::Cron {
            expr: expr.to_owned(),
            reason,
        };
        if expr.len() > MAX_EXPR_LEN {
            return Err(invalid(format!("longer than {MAX_EXPR_LEN} characters")));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|error| invalid(error.to_string()))?;
        let spec = Self { cron, zone };
        // A pattern such as `0 0 30 2 *` parses but never matches: refuse it here rather than
        // store a schedule that can never fire. A pattern that matches at all does so within
        // 28 years (29 February on a given weekday, `0 0 29 2 +1`), counted from a fixed
        // point so the answer does not depend on today.
        let reference = DateTime::<Utc>::from_timestamp(946_684_800, 0) // 2000-01-01
            .ok_or_else(|| invalid("no reference time".into()))?;
        match spec.next_after(reference) {
            Some(next) if next - reference < TimeDelta::days(366 * 29) => Ok(spec),
            _ => Err(SpecError::Never(expr.to_owned())),
        }
    }

    pub fn zone(&self) -> Tz {
        self.zone
    }

    /// The first fire time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.zone);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|next| next.with_timezone(&Utc))
            // Guards the loop against ever moving backwards, whatever the search returns.
            .filter(|next| *next > after)
    }

    /// The first fire time at or after `at`.
    pub fn next_at_or_after(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Fire times fall on whole seconds: anything after `at - 1ns` is at or after `at`.
        self.next_after(at - TimeDelta::nanoseconds(1))
    }

    /// `at` as wall-clock time in the schedule's zone.
    pub fn local(&self, at: DateTime<Utc>) -> DateTime<Tz> {
        at.with_timezone(&self.zone)
    }
}

pub fn parse_zone(zone: &str) -> Result<Tz, SpecError> {
    if zone.is_empty() || zone.len() > MAX_EXPR_LEN {
        return Err(SpecError::Zone(zone.to_owned()));
    }
    Tz::from_str(zone).map_err(|_| SpecError::Zone(zone.to_owned()))
}

/// What happens to firings that were due while nothing fired them (every orchestrator down, or
/// the leader lost), once they are later than `cron.misfire_grace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Drop them; the schedule resumes at its next fire time.
    #[default]
    Skip,
    /// Run once for all of them, then resume.
    CatchUp,
}

impl Missed {
    pub fn as_str(self) -> &'static str {
        match self {
            Missed::Skip => "skip",
            Missed::CatchUp => "catch_up",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "skip" => Some(Missed::Skip),
            "catch_up" => Some(Missed::CatchUp),
            _ => None,
        }
    }
}

/// How a firing came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FireKind {
    /// On time (within the grace period).
    Scheduled,
    /// The one run that stands for firings missed under [`Missed::CatchUp`].
    CatchUp,
    /// Asked for through the API (`run-now`).
    Manual,
}

impl FireKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FireKind::Scheduled => "scheduled",
            FireKind::CatchUp => "catch_up",
            FireKind::Manual => "manual",
        }
    }
}

/// What one tick does with a due schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The firing to make, keyed by its scheduled time, if any.
    pub fire: Option<(DateTime<Utc>, FireKind)>,
    /// Firings later than the grace period: dropped under `skip`, folded into the one catch-up
    /// run under `catch_up`. At most [`MAX_COUNTED_MISSES`].
    pub missed: u32,
    /// The schedule's next fire time after this tick; `None` if it never fires again.
    pub next: Option<DateTime<Utc>>,
}

/// Decides what a tick at `now` does with a schedule whose stored next fire time `due` has
/// come (`due <= now`). A firing is on time if it is at most `grace` old; older ones are
/// missed and follow `policy`. Whatever happens, the next fire time moves past `now`, so a
/// firing is never made twice and an outage never makes a burst.
pub fn plan(
    spec: &CronSpec,
    policy: Missed,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
    grace: Duration,
) -> Plan {
    let grace = TimeDelta::from_std(grace).unwrap_or(TimeDelta::MAX);
    let window_start = now
        .checked_sub_signed(grace)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let on_time = spec
        .next_at_or_after(due.max(window_start))
        .filter(|at| *at <= now);

    let mut missed = 0;
    let mut last_missed = None;
    let mut at = spec.next_at_or_after(due);
    while let Some(time) = at.filter(|time| *time < window_start) {
        missed += 1;
        last_missed = Some(time);
        if missed == MAX_COUNTED_MISSES {
            break;
        }
        at = spec.next_after(time);
    }

    let fire = match (policy, on_time, last_missed) {
        (Missed::Skip, Some(time), _) | (Missed::CatchUp, Some(time), None) => {
            Some((time, FireKind::Scheduled))
        }
        (Missed::CatchUp, Some(time), Some(_)) | (Missed::CatchUp, None, Some(time)) => {
            Some((time, FireKind::CatchUp))
        }
        (Missed::Skip, None, _) | (Missed::CatchUp, None, None) => None,
    };
    Plan {
        fire,
        missed,
        next: spec.next_after(now),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone as _};

    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    /// Every fire time in `[from, to)`.
    fn fires(spec: &CronSpec, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut at = spec.next_at_or_after(from);
        while let Some(time) = at.filter(|t| *t < to) {
            out.push(time);
            at = spec.next_after(time);
        }
        out
    }

    fn local_strings(spec: &CronSpec, times: &[DateTime<Utc>]) -> Vec<String> {
        times
            .iter()
            .map(|t| spec.local(*t).format("%m-%d %H:%M %Z").to_string())
            .collect()
    }

    #[test]
    fn validation_names_what_is_wrong() {
        assert!(CronSpec::parse("30 2 * * *", "Europe/Berlin").is_ok());
        assert!(CronSpec::parse("@daily", "UTC").is_ok());
        assert!(CronSpec::parse("0 9 * * MON-FRI", "America/New_York").is_ok());
        // 29 February that is a Monday: rare, but it fires.
        assert!(CronSpec::parse("0 0 29 2 +1", "UTC").is_ok());
        for expr in [
            "",
            "* * * *",
            "0 * * * * *",
            "0 0 * * * * *",
            "61 * * * *",
            "* 24 * * *",
            "hello world",
            "*/0 * * * *",
        ] {
            match CronSpec::parse(expr, "UTC") {
                Err(SpecError::Cron { .. }) => {}
                other => panic!("{expr:?}: {other:?}"),
            }
        }
        assert_eq!(
            CronSpec::parse("0 0 30 2 *", "UTC").unwrap_err(),
            SpecError::Never("0 0 30 2 *".into())
        );
        for zone in ["", "Mars/Olympus", "europe/paris", "CEST", "+02:00"] {
            assert_eq!(
                CronSpec::parse("* * * * *", zone).unwrap_err(),
                SpecError::Zone(zone.into()),
                "{zone}"
            );
        }
    }

    #[test]
    fn daily_0230_in_berlin_fires_once_on_both_dst_days() {
        let spec = CronSpec::parse("30 2 * * *", "Europe/Berlin").unwrap();
        // 30 March 2025: 02:00 CET becomes 03:00 CEST, so 02:30 does not exist.
        let spring = fires(&spec, utc(2025, 3, 29, 0, 0), utc(2025, 4, 1, 0, 0));
        assert_eq!(
            spring,
            [
                utc(2025, 3, 29, 1, 30), // 02:30 CET
                utc(2025, 3, 30, 1, 0),  // the first instant after the gap: 03:00 CEST
                utc(2025, 3, 31, 0, 30), // 02:30 CEST
            ]
        );
        // 26 October 2025: 03:00 CEST becomes 02:00 CET, so 02:30 happens twice.
        let autumn = fires(&spec, utc(2025, 10, 25, 0, 0), utc(2025, 10, 28, 0, 0));
        assert_eq!(
            autumn,
            [
                utc(2025, 10, 25, 0, 30), // 02:30 CEST
                utc(2025, 10, 26, 0, 30), // the first 02:30 (CEST), not the second (CET)
                utc(2025, 10, 27, 1, 30), // 02:30 CET
            ]
        );
    }

    #[test]
    fn new_york_transitions_at_two_and_at_one() {
        // 9 March 2025: 02:00 EST becomes 03:00 EDT. 2 November 2025: 02:00 EDT becomes
        // 01:00 EST, so 01:30 happens twice.
        let at_0230 = CronSpec::parse("30 2 * * *", "America/New_York").unwrap();
        assert_eq!(
            local_strings(
                &at_0230,
                &fires(&at_0230, utc(2025, 3, 8, 12, 0), utc(2025, 3, 11, 0, 0))
            ),
            ["03-09 03:00 EDT", "03-10 02:30 EDT"]
        );
        let at_0130 = CronSpec::parse("30 1 * * *", "America/New_York").unwrap();
        let autumn = fires(&at_0130, utc(2025, 11, 1, 12, 0), utc(2025, 11, 4, 0, 0));
        assert_eq!(
            local_strings(&at_0130, &autumn),
            ["11-02 01:30 EDT", "11-03 01:30 EST"]
        );
    }

    #[test]
    fn interval_jobs_follow_real_time_through_both_changes() {
        let hourly = CronSpec::parse("0 * * * *", "Europe/Berlin").unwrap();
        // The spring-forward day has 23 hours, the fall-back day 25: one firing per real hour.
        let spring = fires(&hourly, utc(2025, 3, 29, 23, 0), utc(2025, 3, 30, 22, 0));
        assert_eq!(spring.len(), 23);
        let autumn = fires(&hourly, utc(2025, 10, 25, 22, 0), utc(2025, 10, 26, 23, 0));
        assert_eq!(autumn.len(), 25);
        for pair in autumn.windows(2) {
            assert_eq!(pair[1] - pair[0], TimeDelta::hours(1));
        }
    }

    #[test]
    fn fire_times_strictly_increase_and_land_on_the_pattern_in_many_zones() {
        // A property over a year of firings in zones with unusual rules (half-hour DST on Lord
        // Howe, a southern-hemisphere DST, none at all), for fixed and interval patterns.
        let zones = [
            "Europe/Berlin",
            "America/New_York",
            "Australia/Lord_Howe",
            "America/Santiago",
            "Asia/Kolkata",
            "UTC",
        ];
        let patterns = ["30 2 * * *", "15 */3 * * *", "0 0 L * *", "45 1 * * 0"];
        for zone in zones {
            for expr in patterns {
                let spec = CronSpec::parse(expr, zone).unwrap();
                let times = fires(&spec, utc(2025, 1, 1, 0, 0), utc(2026, 1, 1, 0, 0));
                assert!(!times.is_empty(), "{expr} in {zone}");
                for pair in times.windows(2) {
                    assert!(pair[0] < pair[1], "{expr} in {zone}: {pair:?}");
                }
                let daily_like = expr.starts_with("30 2");
                let mut days: Vec<NaiveDate> =
                    times.iter().map(|t| spec.local(*t).date_naive()).collect();
                if daily_like {
                    // A fixed daily job fires on every local day exactly once, DST or not.
                    let len = days.len();
                    days.dedup();
                    assert_eq!(days.len(), len, "{expr} in {zone}: a day fired twice");
                    assert!(
                        (364..=366).contains(&len),
                        "{expr} in {zone}: {len} firings"
                    );
                }
            }
        }
    }

    #[test]
    fn an_on_time_tick_fires_the_due_time_and_moves_on() {
        let spec = CronSpec::parse("*/10 * * * *", "UTC").unwrap();
        let due = utc(2025, 6, 1, 12, 0);
        let plan = plan(
            &spec,
            Missed::Skip,
            due,
            due + TimeDelta::seconds(3),
            Duration::from_secs(60),
        );
        assert_eq!(plan.fire, Some((due, FireKind::Scheduled)));
        assert_eq!(plan.missed, 0);
        assert_eq!(plan.next, Some(utc(2025, 6, 1, 12, 10)));
    }

    #[test]
    fn after_an_outage_skip_drops_and_catch_up_runs_once() {
        let spec = CronSpec::parse("0 * * * *", "Europe/Paris").unwrap();
        let due = utc(2025, 6, 1, 8, 0);
        // Down from 08:00 to 13:20 UTC: 08:00 ... 13:00 were due, all more than 60 s late.
        let now = utc(2025, 6, 1, 13, 20);
        let grace = Duration::from_secs(60);
        let skip = plan(&spec, Missed::Skip, due, now, grace);
        assert_eq!(skip.fire, None);
        assert_eq!(skip.missed, 6);
        assert_eq!(skip.next, Some(utc(2025, 6, 1, 14, 0)));
        let catch_up = plan(&spec, Missed::CatchUp, due, now, grace);
        assert_eq!(
            catch_up.fire,
            Some((utc(2025, 6, 1, 13, 0), FireKind::CatchUp))
        );
        assert_eq!(catch_up.missed, 6);
        assert_eq!(catch_up.next, skip.next);

        // Back just in time for the 13:00 firing: both policies make it; catch_up says it
        // also stands for the missed ones.
        let now = utc(2025, 6, 1, 13, 0) + TimeDelta::seconds(30);
        let skip = plan(&spec, Missed::Skip, due, now, grace);
        assert_eq!(
            skip.fire,
            Some((utc(2025, 6, 1, 13, 0), FireKind::Scheduled))
        );
        assert_eq!(skip.missed, 5);
        let catch_up = plan(&spec, Missed::CatchUp, due, now, grace);
        assert_eq!(
            catch_up.fire,
            Some((utc(2025, 6, 1, 13, 0), FireKind::CatchUp))
        );
    }

    #[test]
    fn a_long_outage_is_counted_up_to_a_bound() {
        let spec = CronSpec::parse("* * * * *", "UTC").unwrap();
        let due = utc(2025, 1, 1, 0, 0);
        let now = utc(2025, 3, 1, 0, 0);
        let plan = plan(&spec, Missed::CatchUp, due, now, Duration::from_secs(30));
        assert_eq!(plan.missed, MAX_COUNTED_MISSES);
        assert!(matches!(plan.fire, Some((_, FireKind::CatchUp))));
        assert_eq!(plan.next, Some(now + TimeDelta::minutes(1)));
    }

    #[test]
    fn missed_policy_names_round_trip() {
        for policy in [Missed::Skip, Missed::CatchUp] {
            assert_eq!(Missed::parse(policy.as_str()), Some(policy));
        }
        assert_eq!(Missed::parse("later"), None);
    }
}
