//! The `Range` header of a download: only `bytes=a-` and `bytes=a-b` are understood;
//! anything else is ignored, and the whole content is served.

use axum::http::{HeaderMap, header};

/// A parsed `Range: bytes=a-` or `bytes=a-b`; anything else is ignored (whole content).
pub(super) fn parse_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    parse_range_value(headers.get(header::RANGE)?.to_str().ok()?)
}

/// Parses the value of a `Range` header (`bytes=a-` or `bytes=a-b`; anything else is
/// `None`). Public so that the fuzz target `http_range` reaches it (fuzz/).
pub fn parse_range_value(value: &str) -> Option<(u64, Option<u64>)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => None,
        end => Some(end.parse().ok()?),
    };
    Some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn ranges() {
        let mut headers = HeaderMap::new();
        assert_eq!(parse_range(&headers), None);
        headers.insert(header::RANGE, HeaderValue::from_static("bytes=10-"));
        assert_eq!(parse_range(&headers), Some((10, None)));
        headers.insert(header::RANGE, HeaderValue::from_static("bytes=1-5"));
        assert_eq!(parse_range(&headers), Some((1, Some(5))));
        headers.insert(header::RANGE, HeaderValue::from_static("bytes=1-5,7-9"));
        assert_eq!(parse_range(&headers), None);
        headers.insert(header::RANGE, HeaderValue::from_static("items=1-5"));
        assert_eq!(parse_range(&headers), None);
    }
}
