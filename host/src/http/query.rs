//! [`StrictQuery`]: axum's `Query` extractor, except that a query string
//! whose names or values do not percent-decode to UTF-8 is refused instead
//! of repaired. axum's parse replaces invalid bytes with U+FFFD, so
//! `?prefix=%FF` would list the keys that start with U+FFFD and
//! `?consistency=%FF` would be reported as the value `"\u{FFFD}"`. Every
//! handler that reads a query takes this extractor and maps [`QueryError`]
//! to its own error shape (the JSON error, or OFREP's).

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// The query string parsed as `T`, every part of it valid UTF-8.
#[derive(Debug)]
pub struct StrictQuery<T>(pub T);

/// Why a query string was refused: what to tell the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// A handler that takes `StrictQuery` without mapping its error answers
/// 400 `invalid_query` with the JSON error body.
impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        ApiError::bad_request("invalid_query", self.0).into_response()
    }
}

impl<T, S> FromRequestParts<S> for StrictQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = QueryError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, QueryError> {
        utf8_only(parts.uri.query())?;
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(t)| StrictQuery(t))
            .map_err(|e| QueryError(e.body_text()))
    }
}

/// An error unless every name and value of `raw` percent-decodes to UTF-8.
fn utf8_only(raw: Option<&str>) -> Result<(), QueryError> {
    for part in raw.unwrap_or_default().split(['&', '=']) {
        // (`+` for a space is ASCII either way: it cannot break UTF-8.)
        if percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .is_err()
        {
            return Err(QueryError(format!(
                "query string part {part:?} does not decode to UTF-8"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Params {
        a: Option<String>,
    }

    async fn extract(uri: &str) -> Result<Option<String>, QueryError> {
        let (mut parts, ()) = Request::get(uri).body(()).unwrap().into_parts();
        StrictQuery::<Params>::from_request_parts(&mut parts, &())
            .await
            .map(|StrictQuery(p)| p.a)
    }

    #[tokio::test]
    async fn invalid_utf8_is_refused_not_repaired() {
        assert_eq!(extract("/x").await, Ok(None));
        assert_eq!(extract("/x?a=%C3%A9").await, Ok(Some("é".into())));
        assert_eq!(extract("/x?a=b+c&z=1").await, Ok(Some("b c".into())));
        for bad in ["/x?a=%FF", "/x?%FF=1", "/x?a=1&b=%E2%82", "/x?a=%ED%A0%80"] {
            let e = extract(bad).await.unwrap_err();
            assert!(e.0.contains("does not decode to UTF-8"), "{bad}: {e}");
        }
        // Other parse errors keep axum's message.
        assert!(extract("/x?a=1&a=2").await.is_err());
    }
}
