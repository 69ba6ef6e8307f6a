//! Temporary stand-in while the metrics module is written.
pub fn encode(_status: &crate::api::Status, _rules: &[crate::api::RuleView]) -> Result<String, std::fmt::Error> {
    Ok(String::new())
}
pub async fn serve(
    _listener: tokio::net::TcpListener,
    _scrape: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<String>>,
) -> std::io::Result<()> {
    Ok(())
}
