//! The browser harness on its own: a real headless Chromium fills in and submits a form of a
//! small server, takes a screenshot, and two browsers keep separate cookies.

use anyhow::{Context, Result, ensure};
use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use test_support::browser::{Browser, WINDOW};

async fn form() -> impl IntoResponse {
    Html(
        "<!DOCTYPE html><html><body><form method=\"post\" action=\"/echo\">\
         <label for=\"word\">Word</label><input id=\"word\" name=\"word\">\
         <button id=\"send\" type=\"submit\">Send</button></form></body></html>",
    )
}

async fn echo(body: String) -> impl IntoResponse {
    let word = body.strip_prefix("word=").unwrap_or("").to_string();
    (
        [(header::SET_COOKIE, format!("word={word}; Path=/"))],
        Html(format!("<p id=\"said\">{word}</p>")),
    )
}

#[tokio::test]
async fn chromium_fills_in_a_form_and_keeps_its_own_cookies() -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = Router::new()
        .route("/", get(form))
        .route("/echo", post(echo));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let one = Browser::start().await?;
    let two = Browser::start().await?;
    one.goto(&format!("{url}/")).await?;
    one.wait_for("#word").await?.send_keys("tulip").await?;
    one.wait_for("#send").await?.click().await?;
    ensure!(one.text_of("#said").await? == "tulip");
    let shot = one.screenshot("harness-form").await?;
    let png = std::fs::read(&shot)?;
    // The IHDR chunk holds the width and height, big-endian, at bytes 16..24.
    let width = u32::from_be_bytes(png.get(16..20).context("short PNG")?.try_into()?);
    ensure!(width == WINDOW.0, "a {width} px wide screenshot");

    two.goto(&format!("{url}/")).await?;
    two.wait_for("#word").await?;
    ensure!(one.client().get_named_cookie("word").await?.value() == "tulip");
    ensure!(
        two.client().get_named_cookie("word").await.is_err(),
        "the second browser has the first one's cookie"
    );
    one.close().await?;
    two.close().await?;
    Ok(())
}
