//! The Teams app package: the zip a Teams admin uploads to make the relay's bot available in
//! their tenant (`relay-node teams manifest`).
//!
//! The package holds `manifest.json` (schema 1.17), a 192×192 colour icon and a 32×32 outline
//! icon, all at the root of the zip. The manifest declares one bot, in the personal and team
//! scopes, with the relay's chat commands, and asks for nothing more: no
//! `webApplicationInfo`, no Graph permissions. Admins therefore see only what every bot gets —
//! receiving messages, sending messages and notifications. With `channel_messages` it also asks
//! for the resource-specific permission `ChannelMessage.Read.Group`, which a team owner grants
//! when adding the app to a team, so that the bot receives every channel message rather than
//! only the ones that @mention it.
//!
//! Everything is validated before anything is produced: a package that Teams would refuse is an
//! error here, with the field named.

use serde_json::{Value, json};
use std::io::Write;

/// `$schema` of the manifest this module writes.
pub const SCHEMA_URL: &str =
    "https://developer.microsoft.com/json-schemas/teams/v1.17/MicrosoftTeams.schema.json";
/// `manifestVersion` of the manifest this module writes.
pub const MANIFEST_VERSION: &str = "1.17";
/// The resource-specific permission that lets a bot receive every message of a team's channels.
pub const CHANNEL_MESSAGES_PERMISSION: &str = "ChannelMessage.Read.Group";
/// `webApplicationInfo.resource` for an app that uses resource-specific consent only: Teams
/// requires a value but does nothing with it.
pub const RSC_RESOURCE: &str = "https://RscBasedStoreApp";

pub const DEFAULT_NAME: &str = "fedrelay";
pub const DEFAULT_VERSION: &str = "1.0.0";
pub const DEFAULT_DEVELOPER_NAME: &str = "fedrelay";
pub const DEFAULT_WEBSITE_URL: &str = "https://github.com/fedrelay/fedrelay";
pub const DEFAULT_PRIVACY_URL: &str =
    "https://github.com/fedrelay/fedrelay/blob/main/docs/teams.md#privacy";
pub const DEFAULT_TERMS_URL: &str =
    "https://github.com/fedrelay/fedrelay/blob/main/docs/teams.md#terms-of-use";
pub const DEFAULT_ACCENT_COLOR: &str = "#3B5BDB";

/// Side of the colour icon, in pixels.
pub const COLOR_ICON_SIZE: u32 = 192;
/// Side of the outline icon, in pixels.
pub const OUTLINE_ICON_SIZE: u32 = 32;

// Limits of the Teams manifest schema.
const SHORT_NAME_MAX: usize = 30;
const FULL_NAME_MAX: usize = 100;
const SHORT_DESCRIPTION_MAX: usize = 80;
const FULL_DESCRIPTION_MAX: usize = 4000;
const DEVELOPER_NAME_MAX: usize = 32;
const URL_MAX: usize = 2048;
const VALID_DOMAINS_MAX: usize = 16;
const PACKAGE_NAME_MAX: usize = 64;
const COMMAND_TITLE_MAX: usize = 32;
const COMMAND_DESCRIPTION_MAX: usize = 128;

/// What goes into the package. [`ManifestOptions::new`] fills in the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestOptions {
    /// The bot's Microsoft App ID (its Entra application id), a GUID: the manifest's `botId`,
    /// and the app's `id` unless `manifest_id` is set.
    pub app_id: String,
    /// The Teams app's own `id`, when it must differ from the bot's (e.g. two packages for one
    /// bot). Most deployments leave it unset.
    pub manifest_id: Option<String>,
    /// `name.short`, what users see in Teams (at most 30 characters).
    pub short_name: String,
    /// `name.full` (at most 100 characters); "<short name> federation relay" when unset.
    pub full_name: Option<String>,
    /// The package version, `MAJOR.MINOR.PATCH`. Teams offers an update only when it grows.
    pub version: String,
    /// `developer.name` (at most 32 characters).
    pub developer_name: String,
    /// `developer.websiteUrl`, an `https://` URL.
    pub website_url: String,
    /// `developer.privacyUrl`, an `https://` URL.
    pub privacy_url: String,
    /// `developer.termsOfUseUrl`, an `https://` URL.
    pub terms_url: String,
    /// `validDomains`: the relay's public host names (no scheme, port or path; `*.example.com`
    /// allowed). Optional for a bot-only app; omitted from the manifest when empty.
    pub valid_domains: Vec<String>,
    /// `accentColor`, `#RRGGBB`; also the background of the colour icon.
    pub accent_color: String,
    /// `packageName`, a reverse-domain identifier, optional.
    pub package_name: Option<String>,
    /// Ask for `ChannelMessage.Read.Group` (resource-specific consent) so the bot receives
    /// every channel message, not only those that @mention it.
    pub channel_messages: bool,
}

impl ManifestOptions {
    /// The defaults, for the bot with this app id.
    pub fn new(app_id: impl Into<String>) -> Self {
        Self {
            app_id: app_id.into(),
            manifest_id: None,
            short_name: DEFAULT_NAME.to_owned(),
            full_name: None,
            version: DEFAULT_VERSION.to_owned(),
            developer_name: DEFAULT_DEVELOPER_NAME.to_owned(),
            website_url: DEFAULT_WEBSITE_URL.to_owned(),
            privacy_url: DEFAULT_PRIVACY_URL.to_owned(),
            terms_url: DEFAULT_TERMS_URL.to_owned(),
            valid_domains: Vec::new(),
            accent_color: DEFAULT_ACCENT_COLOR.to_owned(),
            package_name: None,
            channel_messages: false,
        }
    }

    /// Checks every field against the manifest schema's rules.
    pub fn validate(&self) -> Result<(), ManifestError> {
        check_guid("app id", &self.app_id)?;
        if let Some(id) = &self.manifest_id {
            check_guid("manifest id", id)?;
        }
        check_text("short name", &self.short_name, SHORT_NAME_MAX)?;
        check_text("full name", &self.full_name(), FULL_NAME_MAX)?;
        check_version(&self.version)?;
        check_text("developer name", &self.developer_name, DEVELOPER_NAME_MAX)?;
        check_url("website URL", &self.website_url)?;
        check_url("privacy URL", &self.privacy_url)?;
        check_url("terms-of-use URL", &self.terms_url)?;
        check_color(&self.accent_color)?;
        if self.valid_domains.len() > VALID_DOMAINS_MAX {
            return Err(ManifestError::TooManyDomains(self.valid_domains.len()));
        }
        for d in &self.valid_domains {
            check_domain(d)?;
        }
        if let Some(p) = &self.package_name {
            check_package_name(p)?;
        }
        Ok(())
    }

    fn full_name(&self) -> String {
        self.full_name
            .clone()
            .unwrap_or_else(|| format!("{} federation relay", self.short_name))
    }
}

/// Why a package cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{field} {value:?} is not a GUID (8-4-4-4-12 hex digits)")]
    NotAGuid { field: &'static str, value: String },
    #[error("version {0:?} is not MAJOR.MINOR.PATCH (such as 1.0.0)")]
    BadVersion(String),
    #[error("{field} {value:?} is not an https:// URL")]
    BadUrl { field: &'static str, value: String },
    #[error("accent color {0:?} is not #RRGGBB")]
    BadAccentColor(String),
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} {value:?} has {len} characters, more than the {max} Teams allows")]
    TooLong {
        field: &'static str,
        value: String,
        len: usize,
        max: usize,
    },
    #[error(
        "valid domain {0:?} is not a plain host name (no scheme, port or path; a leading *. wildcard is allowed)"
    )]
    BadDomain(String),
    #[error("{0} valid domains, more than the {VALID_DOMAINS_MAX} Teams allows")]
    TooManyDomains(usize),
    #[error("package name {0:?} is not dot-separated words of letters, digits, _ and -")]
    BadPackageName(String),
    #[error("encoding an icon: {0}")]
    Icon(#[from] png::EncodingError),
    #[error("writing the zip: {0}")]
    Zip(#[from] zip::result::ZipError),
    #[error("writing the zip: {0}")]
    Io(#[from] std::io::Error),
    #[error("serializing the manifest: {0}")]
    Json(#[from] serde_json::Error),
}

// === the manifest ===

/// The relay's bot commands, as (title, description) for each scope's command list.
const PERSONAL_COMMANDS: &[(&str, &str)] = &[
    (
        "help",
        "Show the commands and how to reach people on other networks",
    ),
    (
        "invite",
        "invite user@domain: ask someone on another network to be your contact",
    ),
    ("accept", "accept user@domain: accept a contact request"),
    ("decline", "decline user@domain: decline a contact request"),
    ("contacts", "List your external contacts and their presence"),
    (
        "profile",
        "profile user@domain: show an external contact's profile",
    ),
    (
        "chat",
        "chat user@domain: open a 1:1 chat with an external contact",
    ),
    (
        "to",
        "to user@domain message: send one message to an external contact",
    ),
    (
        "status",
        "status available|away|busy: set the presence your external contacts see",
    ),
];
const TEAM_COMMANDS: &[(&str, &str)] = &[
    (
        "invite",
        "invite user@domain: bring someone from another network into this channel",
    ),
    (
        "remove",
        "remove user@domain: take an external member out of this channel",
    ),
    ("help", "Show the commands for this channel"),
];
const SHORT_DESCRIPTION: &str = "Chat with people on XMPP, SIP and other networks from Teams";

fn full_description(short_name: &str) -> String {
    format!(
        "{short_name} connects Microsoft Teams to people outside your organisation who use \
         other chat systems: XMPP servers, SIP/SIMPLE, and in-house tools speaking HTTP. \
         Through the bot you add external contacts (invite user@domain), accept or decline \
         their requests, see their profiles and presence, and chat 1:1 with them (chat \
         user@domain, or to user@domain followed by a message). Set the presence they see with \
         status. In a team, invite an external person to a channel with invite user@domain; \
         they then take part in the channel's conversation from their own network, and remove \
         takes them out again. Messages keep their formatting, reactions, edits and deletions \
         where the other network supports them; files are shared as links. The relay is \
         operated by your organisation: only the domains it is configured to federate with can \
         reach you, and type help in a chat with the bot to see every command."
    )
}

fn command_list(scope: &str, commands: &[(&str, &str)]) -> Value {
    let commands: Vec<Value> = commands
        .iter()
        .map(|(title, description)| json!({"title": title, "description": description}))
        .collect();
    json!({"scopes": [scope], "commands": commands})
}

/// The `manifest.json` for these options.
pub fn manifest_json(o: &ManifestOptions) -> Result<Value, ManifestError> {
    o.validate()?;
    let description_full = full_description(&o.short_name);
    check_text(
        "short description",
        SHORT_DESCRIPTION,
        SHORT_DESCRIPTION_MAX,
    )?;
    check_text("full description", &description_full, FULL_DESCRIPTION_MAX)?;
    for (title, description) in PERSONAL_COMMANDS.iter().chain(TEAM_COMMANDS) {
        check_text("command title", title, COMMAND_TITLE_MAX)?;
        check_text("command description", description, COMMAND_DESCRIPTION_MAX)?;
    }

    let mut m = json!({
        "$schema": SCHEMA_URL,
        "manifestVersion": MANIFEST_VERSION,
        "version": o.version,
        "id": o.manifest_id.as_deref().unwrap_or(&o.app_id),
        "developer": {
            "name": o.developer_name,
            "websiteUrl": o.website_url,
            "privacyUrl": o.privacy_url,
            "termsOfUseUrl": o.terms_url,
        },
        "name": {"short": o.short_name, "full": o.full_name()},
        "description": {"short": SHORT_DESCRIPTION, "full": description_full},
        "icons": {"color": "color.png", "outline": "outline.png"},
        "accentColor": o.accent_color,
        "bots": [{
            "botId": o.app_id,
            // Group chats are not served: a contact is reached from the personal chat, a
            // shared conversation through a team channel.
            "scopes": ["personal", "team"],
            // The relay sends files as links, so no file-consent cards.
            "supportsFiles": false,
            "isNotificationOnly": false,
            "commandLists": [
                command_list("personal", PERSONAL_COMMANDS),
                command_list("team", TEAM_COMMANDS),
            ],
        }],
    });
    let Some(obj) = m.as_object_mut() else {
        return Ok(m);
    };
    if let Some(p) = &o.package_name {
        obj.insert("packageName".into(), json!(p));
    }
    if !o.valid_domains.is_empty() {
        let mut domains: Vec<String> = Vec::new();
        for d in &o.valid_domains {
            let d = d.to_ascii_lowercase();
            if !domains.contains(&d) {
                domains.push(d);
            }
        }
        obj.insert("validDomains".into(), json!(domains));
    }
    if o.channel_messages {
        obj.insert(
            "webApplicationInfo".into(),
            json!({"id": o.app_id, "resource": RSC_RESOURCE}),
        );
        obj.insert(
            "authorization".into(),
            json!({"permissions": {"resourceSpecific": [
                {"name": CHANNEL_MESSAGES_PERMISSION, "type": "Application"}
            ]}}),
        );
    }
    Ok(m)
}

/// The app package: a zip with `manifest.json`, `color.png` and `outline.png` at its root.
/// The same options always give the same bytes.
pub fn package(o: &ManifestOptions) -> Result<Vec<u8>, ManifestError> {
    let manifest = serde_json::to_vec_pretty(&manifest_json(o)?)?;
    let color = draw_color_icon(parse_color(&o.accent_color)?)?;
    let outline = draw_outline_icon()?;

    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let deflated = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    // PNG is compressed already.
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("manifest.json", deflated)?;
    zip.write_all(&manifest)?;
    zip.start_file("color.png", stored)?;
    zip.write_all(&color)?;
    zip.start_file("outline.png", stored)?;
    zip.write_all(&outline)?;
    Ok(zip.finish()?.into_inner())
}

// === validation ===

fn check_guid(field: &'static str, value: &str) -> Result<(), ManifestError> {
    let groups: Vec<&str> = value.split('-').collect();
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::NotAGuid {
            field,
            value: value.to_owned(),
        })
    }
}

fn check_version(v: &str) -> Result<(), ManifestError> {
    let parts: Vec<&str> = v.split('.').collect();
    let ok = parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 9
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p.len() == 1 || !p.starts_with('0'))
        });
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadVersion(v.to_owned()))
    }
}

fn check_url(field: &'static str, url: &str) -> Result<(), ManifestError> {
    let bad = || ManifestError::BadUrl {
        field,
        value: url.to_owned(),
    };
    let rest = url
        .get(..8)
        .filter(|scheme| scheme.eq_ignore_ascii_case("https://"))
        .and_then(|_| url.get(8..))
        .ok_or_else(bad)?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty()
        || url.len() > URL_MAX
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad());
    }
    Ok(())
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), ManifestError> {
    let len = value.chars().count();
    if value.trim().is_empty() {
        Err(ManifestError::Empty { field })
    } else if len > max {
        Err(ManifestError::TooLong {
            field,
            value: value.to_owned(),
            len,
            max,
        })
    } else {
        Ok(())
    }
}

/// `#RRGGBB` → its three bytes.
fn parse_color(c: &str) -> Result<[u8; 3], ManifestError> {
    let bad = || ManifestError::BadAccentColor(c.to_owned());
    let hex = c.strip_prefix('#').ok_or_else(bad)?;
    if hex.len() != 6 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let byte = |i: usize| {
        hex.get(i..i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(bad)
    };
    Ok([byte(0)?, byte(2)?, byte(4)?])
}

fn check_color(c: &str) -> Result<(), ManifestError> {
    parse_color(c).map(|_| ())
}

/// A host name, or `*.` followed by a host name of at least two labels.
fn check_domain(d: &str) -> Result<(), ManifestError> {
    let bad = || ManifestError::BadDomain(d.to_owned());
    let (wildcard, host) = match d.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, d),
    };
    let labels: Vec<&str> = host.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.len() > 253 || !labels.iter().all(label_ok) || (wildcard && labels.len() < 2) {
        return Err(bad());
    }
    Ok(())
}

fn check_package_name(p: &str) -> Result<(), ManifestError> {
    let word_ok = |w: &str| {
        !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if p.len() > PACKAGE_NAME_MAX || !p.split('.').all(word_ok) {
        return Err(ManifestError::BadPackageName(p.to_owned()));
    }
    Ok(())
}

// === the icons ===

/// The colour icon in the default accent colour: 192×192 PNG bytes.
pub fn icon_color() -> Vec<u8> {
    // A fixed-size RGBA image encoded into memory: the encoder has nothing to fail on.
    parse_color(DEFAULT_ACCENT_COLOR)
        .and_then(draw_color_icon)
        .unwrap_or_default()
}

/// The colour icon on an `#RRGGBB` background: 192×192 PNG bytes.
pub fn icon_color_in(accent_color: &str) -> Result<Vec<u8>, ManifestError> {
    draw_color_icon(parse_color(accent_color)?)
}

/// The outline icon: 32×32 PNG bytes, the glyph in white on a transparent background.
pub fn icon_outline() -> Vec<u8> {
    // As for `icon_color`, encoding cannot fail.
    draw_outline_icon().unwrap_or_default()
}

/// Sub-samples per pixel side, for anti-aliased edges.
const SUPERSAMPLE: u32 = 4;

/// The relay glyph: two arrows, → above ←, in a unit square (y grows downwards).
fn in_glyph(x: f64, y: f64) -> bool {
    const HALF_SHAFT: f64 = 0.07;
    in_capsule(x, y, (0.10, 0.32), (0.66, 0.32), HALF_SHAFT)
        || in_triangle(x, y, (0.58, 0.12), (0.94, 0.32), (0.58, 0.52))
        || in_capsule(x, y, (0.34, 0.68), (0.90, 0.68), HALF_SHAFT)
        || in_triangle(x, y, (0.42, 0.48), (0.06, 0.68), (0.42, 0.88))
}

/// The colour icon's background: a square with rounded corners filling the unit square.
fn in_background(x: f64, y: f64) -> bool {
    const R: f64 = 0.18;
    let dx = (R - x).max(x - (1.0 - R)).max(0.0);
    let dy = (R - y).max(y - (1.0 - R)).max(0.0);
    dx * dx + dy * dy <= R * R
}

fn in_capsule(x: f64, y: f64, a: (f64, f64), b: (f64, f64), r: f64) -> bool {
    let (abx, aby) = (b.0 - a.0, b.1 - a.1);
    let t = (((x - a.0) * abx + (y - a.1) * aby) / (abx * abx + aby * aby)).clamp(0.0, 1.0);
    let (dx, dy) = (x - (a.0 + t * abx), y - (a.1 + t * aby));
    dx * dx + dy * dy <= r * r
}

fn in_triangle(x: f64, y: f64, a: (f64, f64), b: (f64, f64), c: (f64, f64)) -> bool {
    let side = |p: (f64, f64), q: (f64, f64)| (q.0 - p.0) * (y - p.1) - (q.1 - p.1) * (x - p.0);
    let (d1, d2, d3) = (side(a, b), side(b, c), side(c, a));
    (d1 >= 0.0 && d2 >= 0.0 && d3 >= 0.0) || (d1 <= 0.0 && d2 <= 0.0 && d3 <= 0.0)
}

/// For each pixel of a `size`×`size` image, the fraction of it inside `shape`, where `shape`
/// takes coordinates in the unit square.
fn coverage(size: u32, shape: impl Fn(f64, f64) -> bool) -> Vec<f64> {
    let n = f64::from(SUPERSAMPLE);
    let side = f64::from(size);
    let mut out = Vec::with_capacity((size * size) as usize);
    for py in 0..size {
        for px in 0..size {
            let mut hits = 0u32;
            for sy in 0..SUPERSAMPLE {
                for sx in 0..SUPERSAMPLE {
                    let x = (f64::from(px) + (f64::from(sx) + 0.5) / n) / side;
                    let y = (f64::from(py) + (f64::from(sy) + 0.5) / n) / side;
                    if shape(x, y) {
                        hits += 1;
                    }
                }
            }
            out.push(f64::from(hits) / (n * n));
        }
    }
    out
}

/// The glyph placed in the square `[lo, hi]²` of the unit square.
fn glyph_in(lo: f64, hi: f64) -> impl Fn(f64, f64) -> bool {
    move |x, y| {
        let (u, v) = ((x - lo) / (hi - lo), (y - lo) / (hi - lo));
        (0.0..=1.0).contains(&u) && (0.0..=1.0).contains(&v) && in_glyph(u, v)
    }
}

fn to_byte(v: f64) -> u8 {
    // Clamped to 0..=255 first, so the cast is exact.
    (v * 255.0).round().clamp(0.0, 255.0) as u8
}

fn draw_color_icon(accent: [u8; 3]) -> Result<Vec<u8>, ManifestError> {
    let size = COLOR_ICON_SIZE;
    let background = coverage(size, in_background);
    let glyph = coverage(size, glyph_in(0.2, 0.8));
    let mut rgba = Vec::with_capacity(background.len() * 4);
    for (bg, g) in background.into_iter().zip(glyph) {
        // The glyph lies inside the background: blend white over the accent colour by the
        // glyph's share of the covered area, and take the alpha from the background.
        let share = if bg > 0.0 { (g / bg).min(1.0) } else { 0.0 };
        for c in accent {
            let c = f64::from(c) / 255.0;
            rgba.push(to_byte(c + (1.0 - c) * share));
        }
        rgba.push(to_byte(bg));
    }
    Ok(encode_png(size, &rgba)?)
}

fn draw_outline_icon() -> Result<Vec<u8>, ManifestError> {
    let size = OUTLINE_ICON_SIZE;
    let pad = 2.0 / f64::from(size);
    let glyph = coverage(size, glyph_in(pad, 1.0 - pad));
    // White everywhere; the glyph is in the alpha channel alone.
    let rgba: Vec<u8> = glyph
        .into_iter()
        .flat_map(|g| [255, 255, 255, to_byte(g)])
        .collect();
    Ok(encode_png(size, &rgba)?)
}

fn encode_png(size: u32, rgba: &[u8]) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, size, size);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgba)?;
    writer.finish()?;
    Ok(out)
}
