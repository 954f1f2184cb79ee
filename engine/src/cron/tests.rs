use super::*;

/// "2026-03-01 10:00" or "2026-03-01 10:00:30".
fn at(text: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M"))
        .unwrap()
}

fn show(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%d %a %H:%M").to_string()
}

fn schedule(expr: &str) -> CronSchedule {
    CronSchedule::parse(expr).unwrap_or_else(|e| panic!("{e}"))
}

/// The next `n` fire times after `after`, as "2026-03-01 Sun 10:00".
fn fires(expr: &str, after: &str, n: usize) -> Vec<String> {
    let schedule = schedule(expr);
    let mut t = at(after);
    (0..n)
        .map(|_| {
            t = schedule
                .next_after(t)
                .unwrap_or_else(|| panic!("{expr} never fires after {t}"));
            show(t)
        })
        .collect()
}

fn next(expr: &str, after: &str) -> Option<String> {
    schedule(expr).next_after(at(after)).map(show)
}

fn error(expr: &str) -> String {
    CronSchedule::parse(expr).unwrap_err().to_string()
}

#[test]
fn every_minute_is_strictly_after_and_drops_seconds() {
    assert_eq!(
        next("* * * * *", "2026-03-01 10:00:30").unwrap(),
        "2026-03-01 Sun 10:01"
    );
    assert_eq!(
        next("* * * * *", "2026-03-01 10:00:00").unwrap(),
        "2026-03-01 Sun 10:01"
    );
    assert_eq!(
        next("* * * * *", "2026-03-01 10:00:59").unwrap(),
        "2026-03-01 Sun 10:01"
    );
    assert_eq!(
        next("* * * * *", "2026-03-01 23:59:59").unwrap(),
        "2026-03-02 Mon 00:00"
    );
    let leap_second = at("2026-03-01 10:00:59").with_nanosecond(1_500_000_000).unwrap();
    assert_eq!(
        show(schedule("* * * * *").next_after(leap_second).unwrap()),
        "2026-03-01 Sun 10:01"
    );
}

#[test]
fn single_values() {
    assert_eq!(
        next("30 14 * * *", "2026-03-01 14:29:59").unwrap(),
        "2026-03-01 Sun 14:30"
    );
    assert_eq!(next("30 14 * * *", "2026-03-01 14:30").unwrap(), "2026-03-02 Mon 14:30");
    assert_eq!(next("0 0 15 6 *", "2026-03-01 00:00").unwrap(), "2026-06-15 Mon 00:00");
}

#[test]
fn ranges_and_lists() {
    assert_eq!(
        fires("0,15-17 9-10 * * *", "2026-03-01 08:00", 9),
        [
            "2026-03-01 Sun 09:00",
            "2026-03-01 Sun 09:15",
            "2026-03-01 Sun 09:16",
            "2026-03-01 Sun 09:17",
            "2026-03-01 Sun 10:00",
            "2026-03-01 Sun 10:15",
            "2026-03-01 Sun 10:16",
            "2026-03-01 Sun 10:17",
            "2026-03-02 Mon 09:00",
        ]
    );
    assert_eq!(schedule("5,1-3,2 * * * *"), schedule("1-3,5 * * * *"));
}

#[test]
fn steps() {
    assert_eq!(
        fires("*/20 * * * *", "2026-03-01 10:00", 4),
        [
            "2026-03-01 Sun 10:20",
            "2026-03-01 Sun 10:40",
            "2026-03-01 Sun 11:00",
            "2026-03-01 Sun 11:20"
        ]
    );
    assert_eq!(
        fires("10-30/10 * * * *", "2026-03-01 10:00", 4),
        [
            "2026-03-01 Sun 10:10",
            "2026-03-01 Sun 10:20",
            "2026-03-01 Sun 10:30",
            "2026-03-01 Sun 11:10"
        ]
    );
    // A/S runs from A to the field's maximum.
    assert_eq!(
        fires("50/5 * * * *", "2026-03-01 10:00", 3),
        ["2026-03-01 Sun 10:50", "2026-03-01 Sun 10:55", "2026-03-01 Sun 11:50"]
    );
    // */7 restarts at 0 every hour: 56 is the last before the top of the hour.
    assert_eq!(
        fires("*/7 * * * *", "2026-03-01 10:50", 2),
        ["2026-03-01 Sun 10:56", "2026-03-01 Sun 11:00"]
    );
    assert_eq!(
        fires("0 */6 * * *", "2026-03-01 00:00", 4),
        [
            "2026-03-01 Sun 06:00",
            "2026-03-01 Sun 12:00",
            "2026-03-01 Sun 18:00",
            "2026-03-02 Mon 00:00"
        ]
    );
    assert_eq!(schedule("0 0 */10 * *"), schedule("0 0 1,11,21,31 * *"));
    // A step wider than the field matches its start only.
    assert_eq!(schedule("*/100 * * * *"), schedule("0 * * * *"));
    assert_eq!(schedule("*/1 * * * *"), schedule("* * * * *"));
}

#[test]
fn month_and_day_names_in_any_case() {
    assert_eq!(schedule("0 12 * jan,JUL Mon-FRI"), schedule("0 12 * 1,7 1-5"));
    assert_eq!(schedule("0 0 * jan-dec/3 sun"), schedule("0 0 * 1,4,7,10 0"));
    assert_eq!(
        fires("0 9 * feb mon", "2026-01-01 00:00", 2),
        ["2026-02-02 Mon 09:00", "2026-02-09 Mon 09:00"]
    );
}

#[test]
fn seven_is_sunday() {
    assert_eq!(schedule("0 0 * * 7"), schedule("0 0 * * 0"));
    assert_eq!(schedule("0 0 * * 7"), schedule("0 0 * * sun"));
    assert_eq!(schedule("0 0 * * 0,7"), schedule("0 0 * * 0"));
    assert_eq!(
        fires("0 0 * * 5-7", "2026-03-01 00:00", 4),
        [
            "2026-03-06 Fri 00:00",
            "2026-03-07 Sat 00:00",
            "2026-03-08 Sun 00:00",
            "2026-03-13 Fri 00:00"
        ]
    );
    // 1/2 runs 1 to 7: Monday, Wednesday, Friday and Sunday.
    assert_eq!(schedule("0 0 * * 1/2"), schedule("0 0 * * 0,1,3,5"));
}

#[test]
fn both_day_fields_restricted_means_either() {
    // The 13th (a Tuesday) or any Friday.
    assert_eq!(
        fires("0 0 13 * 5", "2026-01-01 00:00", 4),
        [
            "2026-01-02 Fri 00:00",
            "2026-01-09 Fri 00:00",
            "2026-01-13 Tue 00:00",
            "2026-01-16 Fri 00:00"
        ]
    );
    // Only one restricted: that one alone decides.
    assert_eq!(
        fires("0 0 13 * *", "2026-01-01 00:00", 2),
        ["2026-01-13 Tue 00:00", "2026-02-13 Fri 00:00"]
    );
    assert_eq!(
        fires("0 0 * * 5", "2026-01-01 00:00", 2),
        ["2026-01-02 Fri 00:00", "2026-01-09 Fri 00:00"]
    );
    // As in crontab(5), a field starting with * counts as unrestricted even with a step, so
    // both must match: odd days that are Fridays.
    assert_eq!(
        fires("0 0 */2 * fri", "2026-01-01 00:00", 3),
        ["2026-01-09 Fri 00:00", "2026-01-23 Fri 00:00", "2026-02-13 Fri 00:00"]
    );
}

#[test]
fn month_ends_and_leap_years() {
    assert_eq!(
        fires("0 0 31 * *", "2026-01-31 00:00", 3),
        ["2026-03-31 Tue 00:00", "2026-05-31 Sun 00:00", "2026-07-31 Fri 00:00"]
    );
    assert_eq!(
        fires("0 0 29 2 *", "2026-03-01 00:00", 2),
        ["2028-02-29 Tue 00:00", "2032-02-29 Sun 00:00"]
    );
    assert_eq!(next("0 0 29 2 *", "2028-02-28 23:59").unwrap(), "2028-02-29 Tue 00:00");
    assert_eq!(next("0 0 * * *", "2028-02-28 12:00").unwrap(), "2028-02-29 Tue 00:00");
    assert_eq!(next("0 0 * * *", "2027-02-28 12:00").unwrap(), "2027-03-01 Mon 00:00");
    // 2100 is not a leap year, and 2104 is beyond the five-year search.
    assert_eq!(next("0 0 29 2 *", "2096-03-01 00:00"), None);
}

#[test]
fn year_rollover() {
    assert_eq!(next("0 0 1 1 *", "2026-12-31 23:59").unwrap(), "2027-01-01 Fri 00:00");
    assert_eq!(
        next("59 23 31 12 *", "2026-12-31 23:59").unwrap(),
        "2027-12-31 Fri 23:59"
    );
    assert_eq!(
        next("* * * * *", "2026-12-31 23:59:30").unwrap(),
        "2027-01-01 Fri 00:00"
    );
}

#[test]
fn impossible_dates_never_fire() {
    for expr in ["0 0 30 2 *", "0 0 31 2 *", "0 0 31 4,6,9,11 *"] {
        assert_eq!(next(expr, "2026-01-01 00:00"), None, "{expr}");
    }
    // Either day field may match: the Mondays of February do.
    assert_eq!(
        next("0 0 30 2 mon", "2026-01-01 00:00").unwrap(),
        "2026-02-02 Mon 00:00"
    );
    assert_eq!(schedule("* * * * *").next_after(NaiveDateTime::MAX), None);
    // Possible but rarer than the five-year search: a 1 February that is a Monday.
    assert_eq!(
        next("0 0 */31 2 mon", "2026-01-01 00:00").unwrap(),
        "2027-02-01 Mon 00:00"
    );
    assert_eq!(next("0 0 */31 2 mon", "2027-02-01 00:00"), None);
}

#[test]
fn macros() {
    for (name, expr) in [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("  @Daily ", "0 0 * * *"),
    ] {
        assert_eq!(schedule(name), schedule(expr), "{name}");
        assert!(is_cron(name), "{name}");
    }
    assert_eq!(next("@weekly", "2026-03-01 00:00").unwrap(), "2026-03-08 Sun 00:00");
}

#[test]
fn is_cron_tells_cron_from_intervals() {
    assert!(is_cron("*/5 * * * *"));
    assert!(is_cron("  0   0 1 1  * "));
    // Five fields but invalid: still meant as cron, so parse reports the mistake.
    assert!(is_cron("a b c d e"));
    for text in [
        "5 minutes",
        "1 hour",
        "00:05:00",
        "",
        "@reboot",
        "@",
        "* * * *",
        "0 0 * * * 2026",
    ] {
        assert!(!is_cron(text), "{text}");
    }
}

#[test]
fn errors_name_the_expression_the_field_and_the_fix() {
    let cases = [
        (
            "* * *",
            "cron expression \"* * *\": expected 5 fields (minute hour day-of-month month day-of-week) or a macro such as @daily, found 3",
        ),
        (
            "",
            "cron expression \"\": expected 5 fields (minute hour day-of-month month day-of-week) or a macro such as @daily, found 0",
        ),
        (
            "0 0 0 * * *",
            "cron expression \"0 0 0 * * *\": expected 5 fields (minute hour day-of-month month day-of-week) or a macro such as @daily, found 6",
        ),
        (
            "@reboot",
            "cron expression \"@reboot\": unknown macro \"@reboot\"; use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly",
        ),
        ("61 * * * *", "cron expression \"61 * * * *\": minute value 61 is out of range 0-59"),
        ("0 24 * * *", "cron expression \"0 24 * * *\": hour value 24 is out of range 0-23"),
        ("0 0 0 * *", "cron expression \"0 0 0 * *\": day-of-month value 0 is out of range 1-31"),
        ("0 0 1 13 *", "cron expression \"0 0 1 13 *\": month value 13 is out of range 1-12"),
        ("0 0 * * 8", "cron expression \"0 0 * * 8\": day-of-week value 8 is out of range 0-7"),
        (
            "99999999999 * * * *",
            "cron expression \"99999999999 * * * *\": minute value 99999999999 is out of range 0-59",
        ),
        ("1-60 * * * *", "cron expression \"1-60 * * * *\": minute value 60 is out of range 0-59"),
        (
            "*/0 * * * *",
            "cron expression \"*/0 * * * *\": step 0 is not allowed in the minute field; use a step of 1 or more",
        ),
        (
            "0 1-5/00 * * *",
            "cron expression \"0 1-5/00 * * *\": step 00 is not allowed in the hour field; use a step of 1 or more",
        ),
        (
            "*/x * * * *",
            "cron expression \"*/x * * * *\": step \"x\" is not a number in the minute field",
        ),
        ("*/ * * * *", "cron expression \"*/ * * * *\": step \"\" is not a number in the minute field"),
        (
            "0 0 1 foo *",
            "cron expression \"0 0 1 foo *\": \"foo\" is not a number or name in the month field; use a number 1-12 or a name jan-dec",
        ),
        (
            "0 0 * * monday",
            "cron expression \"0 0 * * monday\": \"monday\" is not a number or name in the day-of-week field; use a number 0-7 (0 and 7 are Sunday) or a name sun-sat",
        ),
        (
            "jan * * * *",
            "cron expression \"jan * * * *\": \"jan\" is not a number in the minute field; use a number 0-59",
        ),
        (
            "0 0 1 mon *",
            "cron expression \"0 0 1 mon *\": \"mon\" is not a number or name in the month field; use a number 1-12 or a name jan-dec",
        ),
        (
            "0 0 L * *",
            "cron expression \"0 0 L * *\": \"L\" is not a number in the day-of-month field; use a number 1-31",
        ),
        (
            "-1 * * * *",
            "cron expression \"-1 * * * *\": \"-1\" in the minute field is not a value, a range A-B or a step */S, A-B/S or A/S",
        ),
        (
            "0 1-2-3 * * *",
            "cron expression \"0 1-2-3 * * *\": \"1-2-3\" in the hour field is not a value, a range A-B or a step */S, A-B/S or A/S",
        ),
        (
            "/5 * * * *",
            "cron expression \"/5 * * * *\": \"/5\" in the minute field is not a value, a range A-B or a step */S, A-B/S or A/S",
        ),
        (
            "0 22-2 * * *",
            "cron expression \"0 22-2 * * *\": range 22-2 is backwards in the hour field; write the smaller value first, or to wrap around use the list 22-23,0-2",
        ),
        (
            "0 0 * * fri-mon",
            "cron expression \"0 0 * * fri-mon\": range fri-mon is backwards in the day-of-week field; write the smaller value first, or to wrap around use the list fri-sat,sun-mon",
        ),
        (
            "0 0 * nov-2 *",
            "cron expression \"0 0 * nov-2 *\": range nov-2 is backwards in the month field; write the smaller value first, or to wrap around use the list nov-dec,jan-2",
        ),
        (
            "0 0 * * 6-1",
            "cron expression \"0 0 * * 6-1\": range 6-1 is backwards in the day-of-week field; write the smaller value first, or to wrap around use the list 6-7,0-1",
        ),
        (
            "1,,2 * * * *",
            "cron expression \"1,,2 * * * *\": empty list item in the minute field; remove the extra comma",
        ),
        (
            "0 0 1, * *",
            "cron expression \"0 0 1, * *\": empty list item in the day-of-month field; remove the extra comma",
        ),
    ];
    for (expr, message) in cases {
        assert_eq!(error(expr), message);
    }
    assert_eq!(
        CronSchedule::parse("61 * * * *").unwrap_err(),
        CronError {
            expr: "61 * * * *".into(),
            problem: CronProblem::OutOfRange {
                field: Field::Minute,
                value: "61".into()
            },
        }
    );
}
