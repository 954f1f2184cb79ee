//! Test support for pg_reverse_etl: a strict fake of the `webhook` destination
//! ([`FakeWebhook`]) and helpers to drive the Postgres test cluster ([`cluster`]).

pub mod cluster;
pub mod fake_customerio;
pub mod fake_hubspot;
pub mod fake_intercom;
pub mod fake_meta;
pub mod fake_salesforce;
pub mod fake_slack;
pub mod fake_stripe;
pub mod fake_throttled;
pub mod fake_users_api;
pub mod fake_webhook;
pub mod fault_proxy;
pub mod http_server;
mod http_util;

pub use cluster::{connect, connect_as, error_text, unique, wait_until};
pub use fake_webhook::{
    canonical_json, Builder, FakeWebhook, RecordedRequest, RejectionRule, RequestObserver, Scripted,
};
