//! The bare axum hello-world that `scripts/bench.sh` measures beside the service, so that the
//! service's figures are reported as ratios to what this machine can do at all.
//! Usage: hello-baseline [PORT] (default 9998).

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(9998);
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "Hello, World!" }));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await
}
