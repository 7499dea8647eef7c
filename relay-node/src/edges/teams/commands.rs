//! The bot's commands, as a Teams user types them. A message is a command when its first
//! word is one; anything else is a message for a contact.

/// A contact's address as typed: `user@domain`, domain lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub user: String,
    pub domain: String,
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.user, self.domain)
    }
}

impl Addr {
    pub fn parse(s: &str) -> Option<Addr> {
        let s = s.trim().trim_start_matches("mailto:");
        let (user, domain) = s.rsplit_once('@')?;
        let domain = domain.to_ascii_lowercase();
        // `#…` names a channel, which is joined by invitation, never addressed by command.
        let valid_user = !user.is_empty()
            && !user.starts_with('#')
            && user.len() <= 256
            && !user.contains('@')
            && !user.chars().any(|c| c.is_whitespace() || c.is_control());
        let valid_domain = !domain.is_empty()
            && domain.len() <= 253
            && domain.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            });
        (valid_user && valid_domain).then(|| Addr {
            user: user.to_string(),
            domain,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    Invite { to: Addr, note: String },
    Accept(Option<Addr>),
    Decline(Option<Addr>),
    Contacts,
    Profile(Addr),
    Chat(Addr),
    To { to: Addr, text: String },
    Status { availability: String, note: String },
    Remove(Addr),
    Members,
}

/// A command that could not be read: what to tell the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage(pub &'static str);

pub const AVAILABILITIES: &[&str] = &["available", "away", "busy", "dnd", "offline", "auto"];

/// Reads a command from the text of a message (mentions of the bot already removed).
/// `None`: not a command. `Some(Err)`: a command used wrongly.
pub fn parse(text: &str) -> Option<Result<Command, Usage>> {
    let text = text.trim();
    let (word, rest) = match text.split_once(char::is_whitespace) {
        Some((w, r)) => (w, r.trim()),
        None => (text, ""),
    };
    let word = word.trim_start_matches('/').to_ascii_lowercase();
    let first_arg = || rest.split_whitespace().next().and_then(Addr::parse);
    let after_first = || {
        rest.split_once(char::is_whitespace)
            .map(|(_, r)| r.trim().to_string())
            .unwrap_or_default()
    };
    let cmd = match word.as_str() {
        "help" | "?" if rest.is_empty() => Ok(Command::Help),
        "invite" => first_arg()
            .map(|to| Command::Invite {
                to,
                note: after_first(),
            })
            .ok_or(Usage("invite <user@domain> [note]")),
        "accept" if rest.is_empty() => Ok(Command::Accept(None)),
        "accept" => first_arg()
            .map(|a| Command::Accept(Some(a)))
            .ok_or(Usage("accept [user@domain]")),
        "decline" if rest.is_empty() => Ok(Command::Decline(None)),
        "decline" => first_arg()
            .map(|a| Command::Decline(Some(a)))
            .ok_or(Usage("decline [user@domain]")),
        "contacts" if rest.is_empty() => Ok(Command::Contacts),
        "members" if rest.is_empty() => Ok(Command::Members),
        "profile" => first_arg()
            .map(Command::Profile)
            .ok_or(Usage("profile <user@domain>")),
        "chat" => first_arg()
            .map(Command::Chat)
            .ok_or(Usage("chat <user@domain>")),
        "remove" => first_arg()
            .map(Command::Remove)
            .ok_or(Usage("remove <user@domain>")),
        "to" => match (first_arg(), after_first()) {
            (Some(to), text) if !text.is_empty() => Ok(Command::To { to, text }),
            _ => Err(Usage("to <user@domain> <message>")),
        },
        "status" => {
            let a = rest
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            if AVAILABILITIES.contains(&a.as_str()) {
                Ok(Command::Status {
                    availability: a,
                    note: after_first(),
                })
            } else {
                Err(Usage("status available|away|busy|dnd|offline|auto [note]"))
            }
        }
        _ => return None,
    };
    Some(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Addr {
        Addr::parse(s).unwrap_or_else(|| Addr {
            user: String::new(),
            domain: String::new(),
        })
    }

    #[test]
    fn commands_parse() {
        assert_eq!(parse("help"), Some(Ok(Command::Help)));
        assert_eq!(
            parse("invite bob@B.example hello there"),
            Some(Ok(Command::Invite {
                to: addr("bob@b.example"),
                note: "hello there".into()
            }))
        );
        assert_eq!(parse("Accept"), Some(Ok(Command::Accept(None))));
        assert_eq!(
            parse("to bob@b.example hi  you"),
            Some(Ok(Command::To {
                to: addr("bob@b.example"),
                text: "hi  you".into()
            }))
        );
        assert_eq!(
            parse("status away at lunch"),
            Some(Ok(Command::Status {
                availability: "away".into(),
                note: "at lunch".into()
            }))
        );
        assert_eq!(
            parse("/chat bob@b.example"),
            Some(Ok(Command::Chat(addr("bob@b.example"))))
        );
    }

    #[test]
    fn messages_and_misuse() {
        assert_eq!(parse("hello bob"), None);
        assert_eq!(parse("help me please"), None);
        assert!(matches!(parse("invite bob"), Some(Err(_))));
        assert!(matches!(parse("to bob@b.example"), Some(Err(_))));
        assert!(matches!(parse("status sleeping"), Some(Err(_))));
        assert!(Addr::parse("bob@exa mple").is_none());
        assert!(Addr::parse("@b.example").is_none());
        assert!(Addr::parse("bob@").is_none());
        assert!(Addr::parse("#3f9a@contoso.com").is_none());
    }
}
