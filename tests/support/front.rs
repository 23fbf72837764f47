//! The whole service in-process, with its HTTP front on a free port, and an
//! HTTP client for it (the HTTP tests share this).

use std::time::Duration;

use reqwest::{Client, Method, RequestBuilder};
use switchboard::http::HttpConfig;
use switchboard::server::{Server, ServerConfig};

/// The admin key the front's core is started with.
pub const ADMIN_KEY: &str = "sb-admin-key-for-tests-0123456789";
/// How long any one request may take on a busy CI machine.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Front {
    pub server: Server,
    pub base: String,
    pub client: Client,
    _dir: tempfile::TempDir,
}

impl Front {
    /// The default service (one echo agent, embedded bus) with HTTP on.
    pub async fn start() -> Front {
        Front::start_with(|_| {}).await
    }

    /// The service as `configure` sets it up, with HTTP on a free port.
    pub async fn start_with(configure: impl FnOnce(&mut ServerConfig)) -> Front {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ServerConfig::new(dir.path().join("data"));
        config.admin_key = Some(ADMIN_KEY.to_owned());
        configure(&mut config);
        // On a free port, with whatever else `configure` set.
        let mut http = HttpConfig::new("127.0.0.1:0".parse().expect("addr"));
        if let Some(configured) = config.http.take() {
            http.cors_origins = configured.cors_origins;
        }
        config.http = Some(http);
        let server = Server::start(config).await.expect("the server starts");
        let base = format!("http://{}", server.http_addr().expect("HTTP runs"));
        Front {
            server,
            base,
            client: Client::builder().timeout(WAIT).build().expect("client"),
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A scrape of `/metrics`: its text, checked to be Prometheus's format.
    pub async fn metrics_text(&self) -> String {
        let answer = self
            .request(Method::GET, "/metrics", None)
            .send()
            .await
            .expect("answers");
        assert_eq!(answer.status(), reqwest::StatusCode::OK);
        let content_type = answer.headers()["content-type"].to_str().expect("ascii");
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        answer.text().await.expect("text")
    }

    /// A request to `path`, with `Authorization: Bearer <key>` when given.
    pub fn request(&self, method: Method, path: &str, key: Option<&str>) -> RequestBuilder {
        let request = self.client.request(method, self.url(path));
        match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }
}

/// Every sample of a `/metrics` scrape: `name{labels}` → value.
pub fn samples(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}
