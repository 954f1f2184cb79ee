//! One outbox row as the delivery layer sees it.

use std::fmt;
use std::str::FromStr;

/// What the destination should do with the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Upsert,
    Delete,
}

impl Op {
    /// The spelling stored in `retl.outbox.op` and sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct UnknownOp(pub String);

impl fmt::Display for UnknownOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown operation \"{}\" (expected insert, update, upsert or delete)",
            self.0
        )
    }
}

impl std::error::Error for UnknownOp {}

impl FromStr for Op {
    type Err = UnknownOp;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "insert" => Ok(Op::Insert),
            "update" => Ok(Op::Update),
            "upsert" => Ok(Op::Upsert),
            "delete" => Ok(Op::Delete),
            other => Err(UnknownOp(other.to_string())),
        }
    }
}

#[derive(Clone, Debug)]
pub struct OutboxRecord {
    /// `retl.outbox.id`: how results are matched back to rows.
    pub id: i64,
    pub op: Op,
    /// The primary-key columns as a JSON object.
    pub key: serde_json::Value,
    /// The mapped columns; `None` for deletes.
    pub fields: Option<serde_json::Value>,
    /// The destination's own id for this key, from the sync's identity map (`retl.identities`),
    /// once a connector has reported one.
    pub destination_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_round_trips() {
        for op in [Op::Insert, Op::Update, Op::Upsert, Op::Delete] {
            assert_eq!(op.as_str().parse::<Op>(), Ok(op));
        }
        assert_eq!(Op::Delete.to_string(), "delete");
        let err = "Upsert".parse::<Op>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown operation \"Upsert\" (expected insert, update, upsert or delete)"
        );
    }
}
