//! Checks a sync's fields against the destination before it runs (for `create_sync`, through
//! a worker): one describe request, with one token refresh when it is refused as expired.

use super::{send, Deliverer};
use crate::connector::{redact_all, Destination, FieldProblem};
use crate::oauth::Auth;
use std::time::Duration;

impl Deliverer {
    pub async fn check_fields(
        &self,
        dest: &dyn Destination,
        auth: &Auth,
        fields: &[String],
        timeout: Duration,
    ) -> Result<(), FieldProblem> {
        let unavailable = |e: String| FieldProblem::Unavailable(redact_all(&e, &auth.secrets()));
        let mut refreshed = false;
        loop {
            if auth.token().is_none() && auth.can_refresh() || refreshed {
                if let Some(request) = auth.begin_refresh() {
                    auth.finish_refresh(send(&self.client, request, timeout).await.map_err(String::from)).map_err(unavailable)?;
                }
            }
            let Some(request) = dest.describe_request(auth.token().as_deref()) else {
                return Ok(());
            };
            let answer = send(&self.client, request, timeout).await.map_err(|e| unavailable(e.into()))?;
            if answer.status == 401 && !refreshed && auth.can_refresh() {
                refreshed = true;
                continue;
            }
            if matches!(answer.status, 401 | 403) {
                return Err(unavailable(format!(
                    "the destination rejected the credentials (HTTP {}): check the token in the user mapping",
                    answer.status
                )));
            }
            return dest.check_fields(&answer, fields).map_err(|problem| match problem {
                FieldProblem::Refused(m) => FieldProblem::Refused(redact_all(&m, &auth.secrets())),
                FieldProblem::Unavailable(m) => unavailable(m),
            });
        }
    }
}
