//! Destination checks at `create_sync` / `alter_sync`: the backend hands the destination and
//! the sync's field names to a worker through shared memory (user backends never make HTTP
//! calls), the worker asks the destination (HubSpot properties, Salesforce describe) and
//! answers, and the backend raises the destination's refusal as the statement's error.

use crate::api::option_pairs;
use crate::errors::RetlError;
use crate::shared::{self, ProbeSlot, ProbeState, PROBES, PROBE_FIELDS, PROBE_MESSAGE, PROBE_SLOTS};
use crate::transaction::transaction;
use crate::{destination, settings};
use pgrx::prelude::*;
use retl_engine::connector::{self, FieldProblem};
use retl_engine::options;
use std::time::{Duration, Instant};

/// How long to wait for a (re)starting worker.
const WORKER_GRACE: Duration = Duration::from_secs(15);
/// The worker answers "not visible": the server or mapping is not committed yet.
const NOT_VISIBLE: &str = "\u{0}not visible";

/// Checks `fields` (and the model's `key_columns`) against destination `server_name` for sync
/// `sync` owned by `owner`: locally when the connector can (templates), else through a worker
/// when the connector can describe the destination's fields.
pub fn check_fields(
    sync: &str,
    server_name: &str,
    owner: pg_sys::Oid,
    fields: Vec<String>,
    key_columns: Vec<String>,
) -> Result<(), RetlError> {
    if !settings::CHECK_DESTINATION.get() {
        return Ok(());
    }
    let Some((server, config)) = server_config(server_name)? else { return Ok(()) };
    let local = connector::for_config(&config);
    if let Err(problem) = local.check_fields_locally(&key_columns, &fields) {
        return Err(RetlError::DestinationFields { sync: sync.to_string(), destination: server_name.to_string(), problem });
    }
    if local.describe_request(None).is_none() {
        return Ok(());
    }
    let unchecked = |problem: String| RetlError::DestinationUnchecked {
        sync: sync.to_string(),
        destination: server_name.to_string(),
        problem,
    };
    let current = Spi::get_one::<String>("SELECT current_database()::text").ok().flatten().unwrap_or_default();
    let worker_db = settings::database_name();
    if current != worker_db {
        return Err(unchecked(format!("the workers run in database \"{worker_db}\", not \"{current}\"")));
    }
    let joined = fields.join("\n");
    if joined.len() > PROBE_FIELDS {
        return Err(unchecked(format!("the field names are longer than {PROBE_FIELDS} bytes in all")));
    }
    let started = Instant::now();
    while !shared::any_worker_running() {
        if started.elapsed() > WORKER_GRACE {
            return Err(unchecked("no pg_reverse_etl worker is running to ask it".into()));
        }
        shared::sleep_on_latch(Duration::from_millis(100));
    }
    let slot = {
        let mut probes = PROBES.exclusive();
        let Some(i) = probes.slots.iter().position(|s| s.state == ProbeState::Free) else {
            return Err(unchecked(format!("{PROBE_SLOTS} other checks are in progress; try again")));
        };
        let s = &mut probes.slots[i];
        *s = ProbeSlot::default();
        s.state = ProbeState::Requested;
        s.requester_pid = unsafe { pg_sys::MyProcPid };
        s.server = server;
        s.owner = owner;
        s.fields[..joined.len()].copy_from_slice(joined.as_bytes());
        s.fields_len = joined.len();
        i
    };
    shared::wake_workers();
    // The worker's own request timeout bounds the check; a busy worker gets the same again.
    let deadline = config.timeout * 2 + WORKER_GRACE;
    let answer = PgTryBuilder::new(|| loop {
        let s = &PROBES.share().slots[slot];
        if s.state == ProbeState::Done {
            break Some((s.refused, String::from_utf8_lossy(&s.message[..s.message_len]).into_owned()));
        }
        if started.elapsed() > deadline {
            break None;
        }
        shared::sleep_on_latch(Duration::from_millis(200));
    })
    .catch_others(|e| {
        abandon(slot);
        e.rethrow()
    })
    .execute();
    abandon(slot);
    match answer {
        None => Err(unchecked(format!("no worker answered within {} s", deadline.as_secs()))),
        Some((_, message)) if message.is_empty() => Ok(()),
        Some((_, message)) if message == NOT_VISIBLE => {
            // Created in this very transaction: the worker cannot see it yet.
            pgrx::warning!(
                "fields of sync \"{sync}\" not checked: destination \"{server_name}\" or its user mapping is not \
                 committed yet, so the worker cannot see it"
            );
            Ok(())
        }
        Some((true, problem)) => Err(RetlError::DestinationFields {
            sync: sync.to_string(),
            destination: server_name.to_string(),
            problem,
        }),
        Some((false, problem)) => Err(unchecked(problem)),
    }
}

/// The server's oid and parsed options (no secrets: the backend never reads the user mapping).
fn server_config(name: &str) -> Result<Option<(pg_sys::Oid, options::DestinationConfig)>, RetlError> {
    let row = Spi::connect(|client| {
        let table = client
            .select(
                "SELECT s.oid, s.srvoptions FROM pg_catalog.pg_foreign_server s \
                   JOIN pg_catalog.pg_foreign_data_wrapper w ON w.oid = s.srvfdw \
                  WHERE s.srvname = $1 AND w.fdwname = 'retl'",
                Some(1),
                &[name.into()],
            )
            .unwrap_or_else(|e| error!("{e}"));
        if table.is_empty() {
            return None;
        }
        table.first().get_two::<pg_sys::Oid, Vec<Option<String>>>().ok()
    });
    let Some((Some(oid), raw)) = row else { return Ok(None) };
    let config = options::parse_server_options(&option_pairs(raw.unwrap_or_default())?)
        .map_err(|source| RetlError::DestinationOptions { name: name.to_string(), source })?;
    Ok(Some((oid, config)))
}

/// Nobody waits any more: free the slot unless a worker is answering it (it frees it then).
fn abandon(slot: usize) {
    let mut probes = PROBES.exclusive();
    let s = &mut probes.slots[slot];
    match s.state {
        ProbeState::Claimed => s.requester_pid = 0,
        _ => *s = ProbeSlot::default(),
    }
}

/// Worker side: answer every waiting check.
pub fn serve(runtime: &tokio::runtime::Runtime) {
    loop {
        let claimed = {
            let mut probes = PROBES.exclusive();
            probes.slots.iter_mut().enumerate().find(|(_, s)| s.state == ProbeState::Requested).map(|(i, s)| {
                s.state = ProbeState::Claimed;
                let fields = String::from_utf8_lossy(&s.fields[..s.fields_len]).into_owned();
                (i, s.server, s.owner, fields)
            })
        };
        let Some((slot, server, owner, fields)) = claimed else { return };
        let fields: Vec<String> = fields.split('\n').filter(|f| !f.is_empty()).map(str::to_string).collect();
        let (refused, message) = match answer(runtime, server, owner, &fields) {
            Ok(()) => (false, String::new()),
            Err(FieldProblem::Refused(m)) => (true, m),
            Err(FieldProblem::Unavailable(m)) => (false, m),
        };
        let mut probes = PROBES.exclusive();
        let s = &mut probes.slots[slot];
        if s.requester_pid == 0 {
            *s = ProbeSlot::default();
            continue;
        }
        // Cut at a character boundary to fit the slot.
        let mut end = message.len().min(PROBE_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        s.message[..end].copy_from_slice(&message.as_bytes()[..end]);
        s.message_len = end;
        s.refused = refused;
        s.state = ProbeState::Done;
        shared::wake_pid(s.requester_pid);
    }
}

fn answer(runtime: &tokio::runtime::Runtime, server: pg_sys::Oid, owner: pg_sys::Oid, fields: &[String]) -> Result<(), FieldProblem> {
    let loaded = transaction(|| {
        Spi::connect(|client| {
            let name = client
                .select("SELECT srvname::text FROM pg_catalog.pg_foreign_server WHERE oid = $1", Some(1), &[server.into()])
                .map_err(|e| e.to_string())?;
            let Some(name) = (if name.is_empty() { None } else { name.first().get_one::<String>().ok().flatten() }) else {
                return Ok(None);
            };
            destination::load(client, &name, owner).map(Some).map_err(|e| e.to_string())
        })
    });
    let dest = match loaded {
        Ok(Some(dest)) => dest,
        Ok(None) => return Err(FieldProblem::Unavailable(NOT_VISIBLE.into())),
        Err(message) => return Err(FieldProblem::Unavailable(message)),
    };
    let connector = connector::for_config(&dest.config);
    let deliverer = crate::settings::deliverer(dest.config.timeout).map_err(FieldProblem::Unavailable)?;
    let auth = dest.auth(owner);
    let checked = runtime.block_on(deliverer.check_fields(connector.as_ref(), &auth, fields, dest.config.timeout));
    dest.keep_refreshed(owner, &auth);
    checked
}
