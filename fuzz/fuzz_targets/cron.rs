//! Cron schedules: `is_cron`, `CronSchedule::parse` and `next_after`.
//!
//! Input: UTF-8 text. The first line is the expression; an optional second line is a date-time
//! `YYYY-MM-DD HH:MM:SS` to search from, besides fixed ones (ordinary, leap day, a second
//! before midnight on New Year's Eve, the epoch, and the extremes chrono can represent).
#![no_main]

use chrono::{NaiveDate, NaiveDateTime, TimeDelta, Timelike};
use libfuzzer_sys::fuzz_target;
use retl_engine::cron::{is_cron, CronSchedule};

fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> NaiveDateTime {
    NaiveDate::from_ymd_opt(y, mo, d).unwrap().and_hms_opt(h, mi, s).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (expr, rest) = text.split_once('\n').unwrap_or((text, ""));
    let looks_like_cron = is_cron(expr);
    let schedule = match CronSchedule::parse(expr) {
        Ok(s) => s,
        Err(e) => {
            // The message names the expression and is a proper sentence; rendering never panics.
            let message = e.to_string();
            assert!(message.starts_with("cron expression \""));
            return;
        }
    };
    assert!(looks_like_cron, "{expr:?} parses but is_cron says it is not a cron expression");
    assert_eq!(CronSchedule::parse(expr).as_ref(), Ok(&schedule), "parse is deterministic");

    let mut times = vec![
        at(2026, 3, 1, 10, 0, 30),
        at(2024, 2, 29, 23, 59, 59),
        at(2026, 12, 31, 23, 59, 59),
        at(1970, 1, 1, 0, 0, 0),
        NaiveDateTime::MIN,
        NaiveDateTime::MAX,
        NaiveDateTime::MAX - TimeDelta::days(400),
    ];
    if let Ok(t) = NaiveDateTime::parse_from_str(rest.lines().next().unwrap_or_default().trim(), "%Y-%m-%d %H:%M:%S") {
        times.push(t);
    }
    for t in times {
        let Some(next) = schedule.next_after(t) else { continue };
        assert!(next > t, "{expr:?}: next_after({t}) = {next} is not later");
        assert!(next.second() == 0 && next.nanosecond() == 0, "{expr:?}: {next} is not a whole minute");
        // The search covers five years (plus the rest of the starting month).
        assert!(next - t <= TimeDelta::days(5 * 366 + 31), "{expr:?}: {next} is too far after {t}");
        // A fire time is found again from just before it...
        assert_eq!(schedule.next_after(next - TimeDelta::seconds(1)), Some(next), "{expr:?}: from just before {next}");
        // ...and from any time between `t` and it: no fire time was skipped.
        let mid = t + (next - t) / 2;
        assert_eq!(schedule.next_after(mid), Some(next), "{expr:?}: from {mid}, between {t} and {next}");
        // The one after comes later still.
        if let Some(after) = schedule.next_after(next) {
            assert!(after > next);
        }
    }
});
