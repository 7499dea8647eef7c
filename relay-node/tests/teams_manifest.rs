//! `relay-node teams manifest`: the Teams app package an admin uploads.

use anyhow::{Context, Result, ensure};
use relay_node::teams_manifest::{self, ManifestOptions};
use serde_json::{Value, json};
use std::io::{Cursor, Read};
use std::path::Path;
use std::process::{Command, Output};

const APP_ID: &str = "3f2504e0-4f89-11d3-9a0c-0305e82c3301";

fn relay_node() -> Result<Command> {
    Ok(Command::new(test_support::workspace_binary("relay-node")?))
}

fn manifest_cmd(out: &Path, extra: &[&str]) -> Result<Output> {
    Ok(relay_node()?
        .args(["teams", "manifest", "--out"])
        .arg(out)
        .args(extra)
        .output()?)
}

/// The package's files, by name.
fn unzip(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes))?;
    let mut files = Vec::new();
    for i in 0..archive.len() {
        let mut f = archive.by_index(i)?;
        let mut data = Vec::new();
        f.read_to_end(&mut data)?;
        files.push((f.name().to_owned(), data));
    }
    Ok(files)
}

fn file<'a>(files: &'a [(String, Vec<u8>)], name: &str) -> Result<&'a [u8]> {
    files
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, d)| d.as_slice())
        .with_context(|| format!("{name} missing from the package"))
}

/// (width, height, RGBA pixels) of a PNG, whatever its colour type.
fn decode_png(bytes: &[u8]) -> Result<(u32, u32, Vec<[u8; 4]>)> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size().context("image too large")?];
    let info = reader.next_frame(&mut buf)?;
    ensure!(
        info.bit_depth == png::BitDepth::Eight,
        "bit depth {:?}",
        info.bit_depth
    );
    let data = &buf[..info.buffer_size()];
    let pixels = match info.color_type {
        png::ColorType::Rgba => data
            .chunks_exact(4)
            .map(|p| [p[0], p[1], p[2], p[3]])
            .collect(),
        png::ColorType::Rgb => data
            .chunks_exact(3)
            .map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        png::ColorType::GrayscaleAlpha => data
            .chunks_exact(2)
            .map(|p| [p[0], p[0], p[0], p[1]])
            .collect(),
        png::ColorType::Grayscale => data.iter().map(|&g| [g, g, g, 255]).collect(),
        other => anyhow::bail!("unexpected colour type {other:?}"),
    };
    Ok((info.width, info.height, pixels))
}

fn text_len(v: &Value) -> Result<usize> {
    Ok(v.as_str().context("not a string")?.chars().count())
}

fn check_icons(files: &[(String, Vec<u8>)], accent: [u8; 3]) -> Result<()> {
    let (w, h, color) = decode_png(file(files, "color.png")?)?;
    ensure!((w, h) == (192, 192), "color.png is {w}×{h}");
    // The left edge, half way down, is background: the accent colour, opaque.
    let px = color[96 * 192 + 8];
    ensure!(
        px == [accent[0], accent[1], accent[2], 255],
        "background pixel {px:?}"
    );
    // The glyph is white.
    ensure!(color.contains(&[255, 255, 255, 255]), "no white glyph");

    let (w, h, outline) = decode_png(file(files, "outline.png")?)?;
    ensure!((w, h) == (32, 32), "outline.png is {w}×{h}");
    for (i, p) in outline.iter().enumerate() {
        ensure!(
            p[3] == 0 || p[..3] == [255, 255, 255],
            "outline.png pixel {i} is {p:?}, neither transparent nor white"
        );
    }
    let opaque = outline.iter().filter(|p| p[3] == 255).count();
    let clear = outline.iter().filter(|p| p[3] == 0).count();
    ensure!(
        opaque > 50 && clear > 300,
        "outline.png has {opaque} opaque and {clear} transparent pixels"
    );
    Ok(())
}

#[test]
fn writes_a_package_with_the_manifest_and_both_icons() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("fedrelay-teams.zip");
    let output = manifest_cmd(
        &out,
        &[
            "--app-id",
            APP_ID,
            "--valid-domain",
            "relay.example.com",
            "--valid-domain",
            "*.relay.example.org",
        ],
    )?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        stdout.lines().count() == 1
            && stdout.contains(&*out.to_string_lossy())
            && stdout.contains(APP_ID),
        "{stdout}"
    );

    let files = unzip(&std::fs::read(&out)?)?;
    let mut names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    ensure!(
        names == ["color.png", "manifest.json", "outline.png"],
        "{names:?}"
    );

    let m: Value = serde_json::from_slice(file(&files, "manifest.json")?)?;
    ensure!(
        m["$schema"]
            == "https://developer.microsoft.com/json-schemas/teams/v1.17/MicrosoftTeams.schema.json"
    );
    ensure!(m["manifestVersion"] == "1.17");
    ensure!(m["version"] == "1.0.0");
    ensure!(m["id"] == APP_ID);
    for key in ["name", "websiteUrl", "privacyUrl", "termsOfUseUrl"] {
        ensure!(
            m["developer"][key].is_string(),
            "developer.{key} missing: {m}"
        );
    }
    ensure!(m["developer"]["name"] == "fedrelay");
    for key in ["websiteUrl", "privacyUrl", "termsOfUseUrl"] {
        let url = m["developer"][key].as_str().unwrap_or("");
        ensure!(url.starts_with("https://"), "developer.{key} = {url}");
    }
    ensure!(m["name"]["short"] == "fedrelay");
    ensure!(m["name"]["full"].is_string());
    let short = text_len(&m["description"]["short"])?;
    let full = text_len(&m["description"]["full"])?;
    ensure!((1..=80).contains(&short), "short description: {short}");
    ensure!((1..=4000).contains(&full), "full description: {full}");
    ensure!(m["icons"] == json!({"color": "color.png", "outline": "outline.png"}));
    let accent = m["accentColor"].as_str().context("accentColor")?;
    ensure!(
        accent.len() == 7
            && accent.starts_with('#')
            && accent[1..].bytes().all(|b| b.is_ascii_hexdigit()),
        "accentColor {accent}"
    );
    ensure!(m["validDomains"] == json!(["relay.example.com", "*.relay.example.org"]));

    let bots = m["bots"].as_array().context("bots")?;
    ensure!(bots.len() == 1);
    let bot = &bots[0];
    ensure!(bot["botId"] == APP_ID);
    ensure!(bot["scopes"] == json!(["personal", "team"]));
    ensure!(bot["supportsFiles"] == false);
    ensure!(bot["isNotificationOnly"] == false);
    let lists = bot["commandLists"].as_array().context("commandLists")?;
    let commands_of = |scope: &str| -> Result<Vec<String>> {
        let list = lists
            .iter()
            .find(|l| {
                l["scopes"]
                    .as_array()
                    .is_some_and(|s| s.contains(&json!(scope)))
            })
            .with_context(|| format!("no command list for {scope}"))?;
        let mut titles = Vec::new();
        for c in list["commands"].as_array().context("commands")? {
            ensure!((1..=32).contains(&text_len(&c["title"])?), "{c}");
            ensure!((1..=128).contains(&text_len(&c["description"])?), "{c}");
            titles.push(c["title"].as_str().unwrap_or("").to_owned());
        }
        ensure!(titles.len() <= 10, "{scope}: {titles:?}");
        Ok(titles)
    };
    let personal = commands_of("personal")?;
    for c in [
        "help", "invite", "accept", "decline", "contacts", "profile", "chat", "to", "status",
    ] {
        ensure!(personal.iter().any(|t| t == c), "personal lacks {c}");
    }
    let team = commands_of("team")?;
    for c in ["invite", "remove", "help"] {
        ensure!(team.iter().any(|t| t == c), "team lacks {c}");
    }
    ensure!(
        commands_of("groupChat").is_err(),
        "group chats are not served"
    );

    // A bot-only app: nothing for admins to consent to beyond the bot itself.
    ensure!(m.get("webApplicationInfo").is_none(), "{m}");
    ensure!(m.get("authorization").is_none(), "{m}");
    ensure!(m.get("permissions").is_none(), "{m}");

    check_icons(&files, [0x3B, 0x5B, 0xDB])
}

#[test]
fn channel_messages_asks_for_exactly_the_resource_specific_permission() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("package.zip");
    let output = manifest_cmd(
        &out,
        &[
            "--app-id",
            APP_ID,
            "--channel-messages",
            "--name",
            "Partner chat",
            "--version",
            "2.10.0",
            "--accent-color",
            "#112233",
            "--privacy-url",
            "https://contoso.example/privacy",
        ],
    )?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let files = unzip(&std::fs::read(&out)?)?;
    let m: Value = serde_json::from_slice(file(&files, "manifest.json")?)?;
    ensure!(
        m["webApplicationInfo"] == json!({"id": APP_ID, "resource": "https://RscBasedStoreApp"}),
        "{m}"
    );
    ensure!(
        m["authorization"]
            == json!({"permissions": {"resourceSpecific": [
                {"name": "ChannelMessage.Read.Group", "type": "Application"}
            ]}}),
        "{m}"
    );
    ensure!(m["name"]["short"] == "Partner chat");
    ensure!(m["version"] == "2.10.0");
    ensure!(m["accentColor"] == "#112233");
    ensure!(m["developer"]["privacyUrl"] == "https://contoso.example/privacy");
    ensure!(m.get("validDomains").is_none());
    check_icons(&files, [0x11, 0x22, 0x33])
}

#[test]
fn bad_input_is_refused_with_the_problem_named_and_nothing_written() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("package.zip");
    let cases: &[(&[&str], &str)] = &[
        (&["--app-id", "not-a-guid"], "GUID"),
        (&["--app-id", "3f2504e0-4f89-11d3-9a0c-0305e82c330"], "GUID"),
        (
            &["--app-id", APP_ID, "--privacy-url", "http://example.com/p"],
            "https://",
        ),
        (
            &["--app-id", APP_ID, "--accent-color", "blue"],
            "accent color",
        ),
        (
            &["--app-id", APP_ID, "--accent-color", "#12345G"],
            "accent color",
        ),
        (&["--app-id", APP_ID, "--version", "1.0"], "version"),
        (
            &[
                "--app-id",
                APP_ID,
                "--name",
                "a name far longer than thirty chars",
            ],
            "short name",
        ),
        (
            &[
                "--app-id",
                APP_ID,
                "--valid-domain",
                "https://relay.example.com",
            ],
            "valid domain",
        ),
        (
            &[
                "--app-id",
                APP_ID,
                "--valid-domain",
                "relay.example.com/bot",
            ],
            "valid domain",
        ),
        (
            &["--app-id", APP_ID, "--valid-domain", "*.com"],
            "valid domain",
        ),
    ];
    for (args, problem) in cases {
        let output = manifest_cmd(&out, args)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(!output.status.success(), "{args:?} was accepted");
        ensure!(stderr.contains(problem), "{args:?}: {stderr}");
        ensure!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    // --app-id is required.
    let output = manifest_cmd(&out, &[])?;
    ensure!(!output.status.success());
    ensure!(String::from_utf8_lossy(&output.stderr).contains("--app-id"));
    ensure!(!out.exists());
    Ok(())
}

#[test]
fn the_library_api_agrees_with_the_command() -> Result<()> {
    let mut o = ManifestOptions::new(APP_ID);
    let m = teams_manifest::manifest_json(&o)?;
    ensure!(m["bots"][0]["botId"] == APP_ID && m["id"] == APP_ID);

    o.manifest_id = Some("00000000-0000-0000-0000-000000000001".into());
    o.package_name = Some("com.example.fedrelay".into());
    let m = teams_manifest::manifest_json(&o)?;
    ensure!(m["id"] == "00000000-0000-0000-0000-000000000001");
    ensure!(m["bots"][0]["botId"] == APP_ID);
    ensure!(m["packageName"] == "com.example.fedrelay");

    // The same options give the same bytes, so a package can be rebuilt and compared.
    ensure!(teams_manifest::package(&o)? == teams_manifest::package(&o)?);

    let (w, h, _) = decode_png(&teams_manifest::icon_color())?;
    ensure!((w, h) == (192, 192));
    let (w, h, _) = decode_png(&teams_manifest::icon_outline())?;
    ensure!((w, h) == (32, 32));

    o.package_name = Some("com..example".into());
    ensure!(teams_manifest::package(&o).is_err());
    Ok(())
}
