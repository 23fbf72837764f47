//! The browser console at `GET /` (DESIGN §7): chat with streamed replies,
//! conversations, costs, the audit trail, key management and a health strip.
//!
//! The assets are hand-written files in `console/` (ES modules, no build
//! step), compiled into the binary so the console works offline and always
//! matches the server it talks to. They are separate routes, not inline,
//! because the front's Content-Security-Policy allows only same-origin
//! scripts and styles. The page is only a client of the public API: it can do
//! nothing the pasted key could not do with curl.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One embedded file and how to serve it.
struct Asset {
    path: &'static str,
    body: &'static str,
    content_type: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

macro_rules! asset {
    ($path:literal, $file:literal, $content_type:expr) => {
        Asset {
            path: $path,
            body: include_str!(concat!("console/", $file)),
            content_type: $content_type,
        }
    };
}

/// Everything the console is made of; `index.html` loads the rest.
const ASSETS: &[Asset] = &[
    asset!("/", "index.html", HTML),
    asset!("/console/app.js", "app.js", JS),
    asset!("/console/api.js", "api.js", JS),
    asset!("/console/dom.js", "dom.js", JS),
    asset!("/console/chat.js", "chat.js", JS),
    asset!("/console/costs.js", "costs.js", JS),
    asset!("/console/admin.js", "admin.js", JS),
    asset!("/console/app.css", "app.css", CSS),
    asset!("/console/icon.svg", "icon.svg", SVG),
];

/// The console's routes; stateless, so they merge into any router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS.iter().fold(Router::new(), |router, asset| {
        router.route(
            asset.path,
            get(move |headers: HeaderMap| serve(asset, headers)),
        )
    })
}

/// The asset, or 304 when the browser already holds this build's copy.
/// `no-cache` makes it ask every time, so a new binary's page never runs
/// with an old cached module.
async fn serve(asset: &'static Asset, request: HeaderMap) -> Response {
    let etag = etag(asset.body);
    let cached = request
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|tag| tag.trim() == etag));
    let headers = [
        (
            header::ETAG,
            HeaderValue::from_str(&etag).expect("a quoted hex string is a header value"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    if cached {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    let content_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    )];
    (headers, content_type, asset.body).into_response()
}

/// A strong validator: FNV-1a of the content, stable for one build.
fn etag(body: &str) -> String {
    let hash = body.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("\"{hash:016x}\"")
}

#[cfg(test)]
mod tests {
    use axum::body::{to_bytes, Body};
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn get_path(path: &str, if_none_match: Option<&str>) -> (StatusCode, HeaderMap, String) {
        let mut request = Request::get(path);
        if let Some(tag) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        let response = routes::<()>()
            .oneshot(request.body(Body::empty()).expect("a request"))
            .await
            .expect("the router answers");
        let status = response.status();
        let headers = response.headers().clone();
        let body = to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("the body reads");
        (
            status,
            headers,
            String::from_utf8(body.to_vec()).expect("UTF-8"),
        )
    }

    #[tokio::test]
    async fn the_page_and_its_assets_are_served_with_their_types() {
        let (status, headers, page) = get_path("/", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], HTML);
        assert!(page.starts_with("<!doctype html>"));
        for asset in ASSETS {
            let (status, headers, body) = get_path(asset.path, None).await;
            assert_eq!(status, StatusCode::OK, "{}", asset.path);
            assert_eq!(headers[header::CONTENT_TYPE], asset.content_type);
            assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
            assert_eq!(body, asset.body);
        }
        let (_, headers, _) = get_path("/console/app.js", None).await;
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        let (_, headers, _) = get_path("/console/app.css", None).await;
        assert_eq!(headers[header::CONTENT_TYPE], "text/css; charset=utf-8");
    }

    #[tokio::test]
    async fn a_cached_copy_is_revalidated_with_the_etag() {
        let (_, headers, _) = get_path("/console/app.js", None).await;
        let tag = headers[header::ETAG].to_str().expect("ASCII").to_owned();
        let (status, _, body) = get_path("/console/app.js", Some(&tag)).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
        let (status, _, _) = get_path("/console/app.js", Some("\"0000\"")).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[test]
    fn every_file_the_page_refers_to_is_served() {
        let served = |path: &str| ASSETS.iter().any(|asset| asset.path == path);
        for asset in ASSETS {
            // `src="/console/…"`, `href="/console/…"` and `from './x.js'`.
            let refs = asset
                .body
                .split(['"', '\''])
                .filter(|piece| piece.starts_with("/console/") || piece.starts_with("./"));
            for reference in refs {
                let path = reference.replacen("./", "/console/", 1);
                assert!(
                    served(&path),
                    "{} refers to {reference}, which is not served",
                    asset.path
                );
            }
        }
        for asset in ASSETS
            .iter()
            .filter(|asset| asset.content_type == JS && asset.path != "/console/app.js")
        {
            let module = asset.path.trim_start_matches("/console/");
            let imported = ASSETS
                .iter()
                .any(|other| other.body.contains(&format!("from './{module}'")));
            assert!(imported, "{module} is served but nothing imports it");
        }
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_nothing_inline() {
        const SVG_NAMESPACE: &str = "http://www.w3.org/2000/svg";
        for asset in ASSETS {
            let body = asset.body.replace(SVG_NAMESPACE, "");
            for remote in ["http://", "https://", "//cdn", "@import", "url("] {
                assert!(!body.contains(remote), "{} refers to {remote}", asset.path);
            }
            if asset.content_type == JS {
                // Markup from strings could run text from the API as HTML.
                for unsafe_call in [
                    "innerHTML",
                    "outerHTML",
                    "insertAdjacentHTML",
                    "eval(",
                    "new Function",
                ] {
                    assert!(
                        !body.contains(unsafe_call),
                        "{} uses {unsafe_call}",
                        asset.path
                    );
                }
            }
        }
        // The CSP allows no inline script or style: no <script> body, no
        // style attribute, no inline event handler.
        let page = ASSETS[0].body.to_ascii_lowercase();
        assert!(!page.contains("style="), "an inline style attribute");
        assert!(!page.contains("<style"), "an inline stylesheet");
        assert!(!page.contains(" onclick=") && !page.contains(" onload="));
        for script in page.split("<script").skip(1) {
            let (open, rest) = script.split_once('>').expect("a closed tag");
            assert!(open.contains("src="), "an inline script");
            assert!(rest.starts_with("</script>"), "a script with a body");
        }
    }
}
