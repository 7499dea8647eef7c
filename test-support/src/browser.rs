//! A real browser for tests: headless Chromium driven over WebDriver by Debian's
//! `chromedriver` (packages `chromium` and `chromium-driver`, which `tools/test` installs), on a
//! free loopback port, with a home and temporary directory of its own. Killed on drop.
//!
//! Each [`Browser`] is its own chromedriver and Chromium profile: two of them are two people
//! with separate cookies. Certificates the test's servers present are accepted
//! (`acceptInsecureCerts`): the tests issue their own CAs, which the browser does not know.
//! Screenshots go to `$FEDRELAY_TEST_ARTIFACTS/screenshots/`, by default
//! `<workspace>/target/test-artifacts/screenshots/`.

use anyhow::{Context, Result, bail, ensure};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long [`Browser::start`] waits for chromedriver, and [`Browser::wait_for`] for an
/// element.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The window every screenshot has.
pub const WINDOW: (u32, u32) = (1280, 800);

pub struct Browser {
    client: Client,
    driver: Child,
    _home: tempfile::TempDir,
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Where screenshots and other artefacts of the tests go: `$FEDRELAY_TEST_ARTIFACTS`, or
/// `test-artifacts/` in the target directory of the running test.
pub fn artifacts_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("FEDRELAY_TEST_ARTIFACTS") {
        return Ok(PathBuf::from(d));
    }
    // target/<profile>/deps/<test>-<hash>
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(std::path::Path::parent)
        .and_then(std::path::Path::parent)
        .context("the test executable is not in a target directory")?;
    Ok(target.join("test-artifacts"))
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub async fn start() -> Result<Self> {
        let missing = |what: &str| {
            format!(
                "{what} is not installed: the browser tests need the Debian packages `chromium` and `chromium-driver` (tools/test installs them)"
            )
        };
        let driver_bin = on_path("chromedriver").with_context(|| missing("chromedriver"))?;
        let chromium = on_path("chromium").with_context(|| missing("chromium"))?;
        let home = tempfile::tempdir()?;
        let tmp = home.path().join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let port = crate::free_port()?;
        // Its own process group, so that Chromium, its child, is stopped with it.
        let driver = Command::new(&driver_bin)
            .process_group(0)
            .arg(format!("--port={port}"))
            .env("HOME", home.path())
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", driver_bin.display()))?;
        let mut guard = DriverGuard(Some(driver));
        let url = format!("http://127.0.0.1:{port}");
        wait_ready(guard.child()?, &url).await?;
        let caps = json!({
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    format!("--window-size={},{}", WINDOW.0, WINDOW.1),
                ],
            },
        });
        let serde_json::Value::Object(caps) = caps else {
            bail!("capabilities are an object");
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .context("creating the WebDriver session (run `chromium --headless=new --no-sandbox --dump-dom about:blank` to see why Chromium does not start)")?;
        Ok(Browser {
            client,
            driver: guard.take()?,
            _home: home,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.client()
            .goto(url)
            .await
            .with_context(|| format!("going to {url}"))
    }

    /// Waits for the element `css` (on the page as it loads) and returns it; the error names
    /// the selector and the page.
    pub async fn wait_for(&self, css: &str) -> Result<Element> {
        match self
            .client()
            .wait()
            .at_most(TIMEOUT)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(e) => Ok(e),
            Err(e) => {
                let url = self
                    .client()
                    .current_url()
                    .await
                    .map(|u| u.to_string())
                    .unwrap_or_default();
                let source = self.client().source().await.unwrap_or_default();
                bail!(
                    "no `{css}` on {url} within {TIMEOUT:?}: {e}\n{}",
                    source.chars().take(4000).collect::<String>()
                )
            }
        }
    }

    /// The visible text of the element `css`, once it is there.
    pub async fn text_of(&self, css: &str) -> Result<String> {
        Ok(self.wait_for(css).await?.text().await?)
    }

    /// Saves a PNG of the window as `<artefacts>/screenshots/<name>.png`; its path.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf> {
        save_png(name, self.client().screenshot().await?)
    }

    /// Saves a PNG of the whole page, however long (the window is made as tall as the page
    /// for it, up to 4,000 px, then set back), like [`Self::screenshot`].
    pub async fn screenshot_page(&self, name: &str) -> Result<PathBuf> {
        let height = self
            .client()
            .execute("return document.documentElement.scrollHeight;", Vec::new())
            .await?
            .as_u64()
            .context("the page's height")?;
        let c = self.client();
        c.set_window_size(WINDOW.0, (height as u32).clamp(WINDOW.1, 4000))
            .await?;
        let png = c.screenshot().await;
        c.set_window_size(WINDOW.0, WINDOW.1).await?;
        save_png(name, png?)
    }

    /// Ends the WebDriver session (Chromium quits); chromedriver stops on drop.
    pub async fn close(self) -> Result<()> {
        self.client.clone().close().await?;
        Ok(())
    }
}

fn save_png(name: &str, png: Vec<u8>) -> Result<PathBuf> {
    ensure!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is not a PNG"
    );
    let dir = artifacts_dir()?.join("screenshots");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png)?;
    Ok(path)
}

/// Kills a process group (chromedriver and the Chromium it started).
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
    }
}

/// chromedriver until the session is made: killed if starting fails.
struct DriverGuard(Option<Child>);

impl DriverGuard {
    fn child(&mut self) -> Result<&mut Child> {
        self.0.as_mut().context("chromedriver already handed over")
    }

    fn take(&mut self) -> Result<Child> {
        self.0.take().context("chromedriver already handed over")
    }
}

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            kill_group(c);
        }
    }
}

/// Polls chromedriver's `/status` until it says ready.
async fn wait_ready(driver: &mut Child, url: &str) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = driver.try_wait()? {
            bail!("chromedriver exited at start: {status}");
        }
        if let Ok(r) = http.get(format!("{url}/status")).send().await
            && let Ok(v) = r.json::<serde_json::Value>().await
            && v["value"]["ready"] == true
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("chromedriver did not report ready within {TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
