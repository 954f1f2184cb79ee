//! Cron schedules: the classic 5-field syntax (as in crontab(5) and pg_cron) and the next time
//! one fires. Works on naive local date-times only: the caller owns time zones and converts with
//! Postgres's tz database (UTC -> local, ask for the next local fire time, convert back), so this
//! module never needs one.

use chrono::{Datelike, Months, NaiveDate, NaiveDateTime, TimeDelta, Timelike};
use std::fmt;

/// The search gives up after five years, so an impossible schedule (`0 0 30 2 *`) cannot search
/// forever. Every ordinary schedule fires well within that; the exceptions are freaks such as
/// 29 February across 2100 (not a leap year), or `0 0 */31 2 mon` (a 1 February that is a
/// Monday: 2027, then 2038).
const SEARCH_MONTHS: u32 = 5 * 12;

const FIELD_LIST: &str = "minute hour day-of-month month day-of-week";
const MACROS: &str = "@yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly";
const MONTH_NAMES: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

impl Field {
    const ALL: [Field; 5] = [
        Field::Minute,
        Field::Hour,
        Field::DayOfMonth,
        Field::Month,
        Field::DayOfWeek,
    ];

    fn bounds(self) -> (u32, u32) {
        match self {
            Field::Minute => (0, 59),
            Field::Hour => (0, 23),
            Field::DayOfMonth => (1, 31),
            Field::Month => (1, 12),
            // 7 is accepted as a second Sunday, as in Vixie cron.
            Field::DayOfWeek => (0, 7),
        }
    }

    /// Names accepted in place of numbers, the first one standing for `names_from`.
    fn names(self) -> (&'static [&'static str], u32) {
        match self {
            Field::Month => (&MONTH_NAMES, 1),
            Field::DayOfWeek => (&DAY_NAMES, 0),
            _ => (&[], 0),
        }
    }

    /// What a value in this field may look like, for error messages.
    fn accepted(self) -> &'static str {
        match self {
            Field::Minute => "a number 0-59",
            Field::Hour => "a number 0-23",
            Field::DayOfMonth => "a number 1-31",
            Field::Month => "a number 1-12 or a name jan-dec",
            Field::DayOfWeek => "a number 0-7 (0 and 7 are Sunday) or a name sun-sat",
        }
    }

    fn kind_of_value(self) -> &'static str {
        if self.names().0.is_empty() {
            "a number"
        } else {
            "a number or name"
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day-of-month",
            Field::Month => "month",
            Field::DayOfWeek => "day-of-week",
        })
    }
}

/// What is wrong with an expression; [`CronError`] adds the expression itself.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum CronProblem {
    #[error("expected 5 fields ({FIELD_LIST}) or a macro such as @daily, found {0}")]
    FieldCount(usize),
    #[error("unknown macro \"{0}\"; use {MACROS}")]
    UnknownMacro(String),
    #[error("{field} value {value} is out of range {}-{}", .field.bounds().0, .field.bounds().1)]
    OutOfRange { field: Field, value: String },
    #[error("\"{text}\" is not {} in the {field} field; use {}", .field.kind_of_value(), .field.accepted())]
    NotAValue { field: Field, text: String },
    #[error("\"{item}\" in the {field} field is not a value, a range A-B or a step */S, A-B/S or A/S")]
    Malformed { field: Field, item: String },
    #[error("step {step} is not allowed in the {field} field; use a step of 1 or more")]
    ZeroStep { field: Field, step: String },
    #[error("step \"{step}\" is not a number in the {field} field")]
    BadStep { field: Field, step: String },
    #[error("range {range} is backwards in the {field} field; write the smaller value first, or to wrap around use the list {wrapped}")]
    Backwards {
        field: Field,
        range: String,
        /// The same span as a list that does wrap, e.g. 22-23,0-2 for 22-2.
        wrapped: String,
    },
    #[error("empty list item in the {field} field; remove the extra comma")]
    EmptyItem { field: Field },
}

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[error("cron expression \"{expr}\": {problem}")]
pub struct CronError {
    pub expr: String,
    pub problem: CronProblem,
}

/// A parsed schedule: one bit per allowed value of each field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CronSchedule {
    minutes: u64,
    hours: u64,
    /// Bits 1-31.
    days_of_month: u64,
    /// Bits 1-12.
    months: u64,
    /// Bits 0-6, Sunday = 0 (a 7 in the expression is folded onto 0).
    days_of_week: u64,
    /// Both day fields are restricted, so a day matches when EITHER does (crontab(5): "If both
    /// fields are restricted (i.e., don't start with *), the command will be run when either
    /// field matches"). Otherwise both must match, which is the same as the restricted one.
    day_either: bool,
}

/// The text of a macro, or `None` if `name` is not one.
fn expand_macro(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        _ => return None,
    })
}

/// Whether `expr` looks like a cron expression (5 fields, or a macro) rather than something
/// else such as an interval ('5 minutes' has 2 fields). It says nothing about validity:
/// [`CronSchedule::parse`] does.
pub fn is_cron(expr: &str) -> bool {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    match fields[..] {
        [single] => expand_macro(single).is_some(),
        _ => fields.len() == 5,
    }
}

impl CronSchedule {
    pub fn parse(expr: &str) -> Result<CronSchedule, CronError> {
        let fail = |problem| CronError {
            expr: expr.to_string(),
            problem,
        };
        let mut fields: Vec<&str> = expr.split_whitespace().collect();
        if let [single] = fields[..] {
            if single.starts_with('@') {
                let text = expand_macro(single).ok_or_else(|| fail(CronProblem::UnknownMacro(single.to_string())))?;
                fields = text.split(' ').collect();
            }
        }
        if fields.len() != 5 {
            return Err(fail(CronProblem::FieldCount(fields.len())));
        }
        let mut masks = [0u64; 5];
        for ((mask, field), text) in masks.iter_mut().zip(Field::ALL).zip(&fields) {
            *mask = parse_field(field, text).map_err(fail)?;
        }
        let [minutes, hours, days_of_month, months, mut days_of_week] = masks;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week | 1) & !(1 << 7);
        }
        Ok(CronSchedule {
            minutes,
            hours,
            days_of_month,
            months,
            days_of_week,
            day_either: !fields[2].starts_with('*') && !fields[4].starts_with('*'),
        })
    }

    /// The first whole minute strictly after `after` at which the schedule fires (seconds are
    /// dropped: after 10:00:30 comes 10:01 at the earliest), or `None` if there is none within
    /// five years. Skips whole months and days that cannot match, so at worst it looks at each
    /// day of those years once.
    pub fn next_after(&self, after: NaiveDateTime) -> Option<NaiveDateTime> {
        let start = after
            .with_second(0)?
            .with_nanosecond(0)?
            .checked_add_signed(TimeDelta::minutes(1))?;
        let end = start.date().checked_add_months(Months::new(SEARCH_MONTHS))?;
        let mut date = start.date();
        // The earliest time of day still allowed on `date`: only the first day is partial.
        let mut from = (start.hour(), start.minute());
        while date < end {
            if !has(self.months, date.month()) {
                date = first_of_next_month(date)?;
            } else if self.day_matches(date) {
                if let Some((hour, minute)) = self.time_from(from) {
                    return date.and_hms_opt(hour, minute, 0);
                }
                date = date.succ_opt()?;
            } else {
                date = date.succ_opt()?;
            }
            from = (0, 0);
        }
        None
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        let by_month = has(self.days_of_month, date.day());
        let by_week = has(self.days_of_week, date.weekday().num_days_from_sunday());
        if self.day_either {
            by_month || by_week
        } else {
            by_month && by_week
        }
    }

    /// The first allowed (hour, minute) at or after `from` on a day that matches.
    fn time_from(&self, (hour, minute): (u32, u32)) -> Option<(u32, u32)> {
        let mut h = next_bit(self.hours, hour)?;
        let mut m = if h == hour { minute } else { 0 };
        loop {
            if let Some(m) = next_bit(self.minutes, m) {
                return Some((h, m));
            }
            h = next_bit(self.hours, h + 1)?;
            m = 0;
        }
    }
}

fn has(mask: u64, bit: u32) -> bool {
    mask & (1 << bit) != 0
}

/// The lowest set bit of `mask` at or above `from`.
fn next_bit(mask: u64, from: u32) -> Option<u32> {
    if from >= 64 {
        return None;
    }
    let rest = mask & (u64::MAX << from);
    (rest != 0).then(|| rest.trailing_zeros())
}

fn first_of_next_month(date: NaiveDate) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(date.year(), date.month(), 1)?.checked_add_months(Months::new(1))
}

/// One field (a comma-separated list) as a bit mask.
fn parse_field(field: Field, text: &str) -> Result<u64, CronProblem> {
    let mut mask = 0;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(CronProblem::EmptyItem { field });
        }
        mask |= parse_item(field, item)?;
    }
    Ok(mask)
}

/// `*`, `N`, `A-B`, each optionally followed by `/S`; `N/S` runs from N to the field's maximum.
fn parse_item(field: Field, item: &str) -> Result<u64, CronProblem> {
    let (min, max) = field.bounds();
    let malformed = || CronProblem::Malformed {
        field,
        item: item.to_string(),
    };
    let (base, step) = match item.split_once('/') {
        None => (item, None),
        Some((base, step)) => (base, Some(parse_step(field, step)?)),
    };
    let (low, high) = if base == "*" {
        (min, max)
    } else if let Some((a, b)) = base.split_once('-') {
        if a.is_empty() || b.is_empty() || b.contains('-') {
            return Err(malformed());
        }
        let (low, high) = (parse_value(field, a)?, parse_value(field, b)?);
        if low > high {
            return Err(CronProblem::Backwards {
                field,
                range: base.to_string(),
                wrapped: wrapped(field, a, b),
            });
        }
        (low, high)
    } else if base.is_empty() {
        return Err(malformed());
    } else {
        let value = parse_value(field, base)?;
        (value, if step.is_some() { max } else { value })
    };
    let step = step.unwrap_or(1);
    Ok((low..=high).step_by(step).fold(0, |mask, bit| mask | 1 << bit))
}

/// `a-b` for a backwards range, written as the list that wraps around the field's end:
/// 22-2 -> 22-23,0-2, fri-mon -> fri-sat,sun-mon (names if the range used any).
fn wrapped(field: Field, a: &str, b: &str) -> String {
    let (min, max) = field.bounds();
    let (names, _) = field.names();
    let numeric = |t: &str| t.bytes().all(|c| c.is_ascii_digit());
    match (names.first(), names.last()) {
        (Some(first), Some(last)) if !(numeric(a) && numeric(b)) => format!("{a}-{last},{first}-{b}"),
        _ => format!("{a}-{max},{min}-{b}"),
    }
}

fn parse_step(field: Field, step: &str) -> Result<usize, CronProblem> {
    if step.is_empty() || !step.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CronProblem::BadStep {
            field,
            step: step.to_string(),
        });
    }
    // All digits: only an absurdly long step fails to parse, and it means "the start only".
    match step.parse::<usize>().unwrap_or(usize::MAX) {
        0 => Err(CronProblem::ZeroStep {
            field,
            step: step.to_string(),
        }),
        n => Ok(n),
    }
}

fn parse_value(field: Field, text: &str) -> Result<u32, CronProblem> {
    let (min, max) = field.bounds();
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u32>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(CronProblem::OutOfRange {
                field,
                value: text.to_string(),
            }),
        };
    }
    let (names, first) = field.names();
    names
        .iter()
        .position(|name| name.eq_ignore_ascii_case(text))
        .map(|i| first + i as u32)
        .ok_or_else(|| CronProblem::NotAValue {
            field,
            text: text.to_string(),
        })
}

#[cfg(test)]
mod tests;
