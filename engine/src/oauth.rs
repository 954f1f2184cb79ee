//! The access token a delivery sends, and how to get a new one when the destination says it
//! expired (OAuth 2.0 refresh-token or client-credentials grant, RFC 6749 §6 and §4.4).

use crate::connector::{excerpt, HttpRequest, HttpResponse};
use crate::options::OAuthSecrets;
use std::cell::{Cell, RefCell};

/// The credentials of one delivery. The token may change during it (one refresh at most), so
/// batches read it afresh for every request.
pub struct Auth {
    token: RefCell<Option<String>>,
    client: Option<OAuthClient>,
    /// Bumped by every new token, so a batch that was refused with an older one just retries.
    generation: Cell<u32>,
    /// A refresh was tried (successful or not): at most one per delivery.
    refresh_tried: Cell<bool>,
    refreshing: Cell<bool>,
}

#[derive(Clone, Debug)]
pub struct OAuthClient {
    pub token_url: String,
    pub secrets: OAuthSecrets,
}

impl Auth {
    pub fn new(token: Option<String>, client: Option<OAuthClient>) -> Self {
        Auth {
            token: RefCell::new(token),
            client,
            generation: Cell::new(0),
            refresh_tried: Cell::new(false),
            refreshing: Cell::new(false),
        }
    }

    /// A fixed token that is never refreshed.
    pub fn fixed(token: Option<&str>) -> Self {
        Auth::new(token.map(str::to_string), None)
    }

    pub fn token(&self) -> Option<String> {
        self.token.borrow().clone()
    }

    pub fn generation(&self) -> u32 {
        self.generation.get()
    }

    /// The token and the OAuth secrets: everything that must never appear in a message.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets: Vec<String> = self.token().into_iter().collect();
        if let Some(client) = &self.client {
            secrets.push(client.secrets.client_secret.clone());
            secrets.extend(client.secrets.refresh_token.clone());
        }
        secrets
    }

    /// Whether the user mapping holds OAuth client credentials.
    pub fn has_client(&self) -> bool {
        self.client.is_some()
    }

    pub fn can_refresh(&self) -> bool {
        self.client.is_some() && !self.refresh_tried.get()
    }

    pub fn is_refreshing(&self) -> bool {
        self.refreshing.get()
    }

    /// Starts the one refresh of this delivery: the request to send, or `None` when there is
    /// no OAuth client or a refresh was already tried.
    pub fn begin_refresh(&self) -> Option<HttpRequest> {
        let client = self.client.as_ref().filter(|_| !self.refresh_tried.get())?;
        self.refresh_tried.set(true);
        self.refreshing.set(true);
        Some(client.refresh_request())
    }

    /// Ends the refresh with the token endpoint's answer (`Err`: transport failure).
    pub fn finish_refresh(&self, answer: Result<HttpResponse, String>) -> Result<(), String> {
        self.refreshing.set(false);
        let Some(client) = &self.client else {
            return Err("no OAuth client".into());
        };
        let token = answer.and_then(|resp| client.parse_response(&resp))?;
        *self.token.borrow_mut() = Some(token);
        self.generation.set(self.generation.get() + 1);
        Ok(())
    }
}

impl OAuthClient {
    fn refresh_request(&self) -> HttpRequest {
        let s = &self.secrets;
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        match &s.refresh_token {
            Some(refresh_token) => form
                .append_pair("grant_type", "refresh_token")
                .append_pair("refresh_token", refresh_token),
            None => form.append_pair("grant_type", "client_credentials"),
        };
        form.append_pair("client_id", &s.client_id).append_pair("client_secret", &s.client_secret);
        HttpRequest {
            method: reqwest::Method::POST,
            url: self.token_url.clone(),
            headers: vec![
                ("Content-Type".into(), "application/x-www-form-urlencoded".into()),
                ("Accept".into(), "application/json".into()),
            ],
            body: form.finish().into_bytes(),
        }
    }

    /// The new access token, or why there is none (OAuth's `error`/`error_description`, or
    /// HubSpot's `status`/`message`).
    fn parse_response(&self, resp: &HttpResponse) -> Result<String, String> {
        let json: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
        if (200..300).contains(&resp.status) {
            if let Some(token) = json["access_token"].as_str().filter(|t| crate::options::valid_token(t)) {
                return Ok(token.to_string());
            }
        }
        let text = |a: &str, b: &str| {
            let parts: Vec<&str> = [json[a].as_str(), json[b].as_str()].into_iter().flatten().collect();
            (!parts.is_empty()).then(|| parts.join(": "))
        };
        let reason = text("error", "error_description")
            .or_else(|| text("status", "message"))
            .unwrap_or_else(|| excerpt(&resp.body, 200));
        Err(format!(
            "could not refresh the access token at {} (HTTP {}: {reason}): check client_id, client_secret and \
             refresh_token in the user mapping",
            self.token_url, resp.status
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(refresh: Option<&str>) -> OAuthClient {
        OAuthClient {
            token_url: "https://login.example/token".into(),
            secrets: OAuthSecrets {
                client_id: "cid".into(),
                client_secret: "c s&=".into(),
                refresh_token: refresh.map(str::to_string),
            },
        }
    }

    fn answer(status: u16, body: &str) -> Result<HttpResponse, String> {
        Ok(HttpResponse { status, headers: vec![], body: body.as_bytes().to_vec() })
    }

    #[test]
    fn refresh_and_client_credentials_requests() {
        let req = client(Some("rt/1")).refresh_request();
        assert_eq!(req.method, reqwest::Method::POST);
        assert_eq!(
            String::from_utf8(req.body).unwrap(),
            "grant_type=refresh_token&refresh_token=rt%2F1&client_id=cid&client_secret=c+s%26%3D"
        );
        let req = client(None).refresh_request();
        assert_eq!(String::from_utf8(req.body).unwrap(), "grant_type=client_credentials&client_id=cid&client_secret=c+s%26%3D");
    }

    #[test]
    fn one_refresh_per_delivery() {
        let auth = Auth::new(Some("old".into()), Some(client(Some("rt"))));
        assert!(auth.can_refresh());
        assert!(auth.begin_refresh().is_some());
        assert!(auth.is_refreshing());
        auth.finish_refresh(answer(200, r#"{"access_token":"new","expires_in":1800}"#)).unwrap();
        assert_eq!((auth.token().as_deref(), auth.generation(), auth.can_refresh()), (Some("new"), 1, false));
        assert!(auth.begin_refresh().is_none());
        assert!(!Auth::fixed(Some("t")).can_refresh());
    }

    #[test]
    fn refusals_say_why_without_secrets() {
        let auth = Auth::new(None, Some(client(Some("rt"))));
        auth.begin_refresh();
        let err = auth
            .finish_refresh(answer(400, r#"{"error":"invalid_grant","error_description":"expired access/refresh token"}"#))
            .unwrap_err();
        assert_eq!(
            err,
            "could not refresh the access token at https://login.example/token (HTTP 400: invalid_grant: expired \
             access/refresh token): check client_id, client_secret and refresh_token in the user mapping"
        );
        let auth = Auth::new(None, Some(client(Some("rt"))));
        auth.begin_refresh();
        let err = auth.finish_refresh(answer(400, r#"{"status":"BAD_REFRESH_TOKEN","message":"missing or unknown refresh token"}"#));
        assert!(err.unwrap_err().contains("(HTTP 400: BAD_REFRESH_TOKEN: missing or unknown refresh token)"));
        assert_eq!(auth.token(), None);
    }
}
