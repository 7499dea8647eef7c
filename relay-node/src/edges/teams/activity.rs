//! The Bot Framework activities the edge reads. Lenient on fields it does not use (the
//! service adds fields over time); strict on the ones it relies on.

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Activity {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub id: Option<String>,
    /// When the event happened (for an edit or delete: when it was made).
    #[serde(default)]
    pub timestamp: Option<String>,
    pub service_url: String,
    pub channel_id: String,
    #[serde(default)]
    pub from: Option<ChannelAccount>,
    #[serde(default)]
    pub recipient: Option<ChannelAccount>,
    #[serde(default)]
    pub conversation: Option<Conversation>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    #[serde(default)]
    pub entities: Vec<Value>,
    #[serde(default)]
    pub channel_data: Option<ChannelData>,
    #[serde(default)]
    pub reply_to_id: Option<String>,
    #[serde(default)]
    pub members_added: Vec<ChannelAccount>,
    #[serde(default)]
    pub members_removed: Vec<ChannelAccount>,
    #[serde(default)]
    pub reactions_added: Vec<Reaction>,
    #[serde(default)]
    pub reactions_removed: Vec<Reaction>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub value: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelAccount {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub aad_object_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conversation {
    pub id: String,
    #[serde(default)]
    pub conversation_type: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub content_type: String,
    #[serde(default)]
    pub content_url: Option<String>,
    #[serde(default)]
    pub content: Option<Value>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Reaction {
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IdName {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelData {
    #[serde(default)]
    pub tenant: Option<IdName>,
    #[serde(default)]
    pub event_type: Option<String>,
    #[serde(default)]
    pub team: Option<IdName>,
    #[serde(default)]
    pub channel: Option<IdName>,
}

/// Where an activity happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Personal,
    Channel,
    GroupChat,
}

impl Activity {
    pub fn tenant_id(&self) -> Option<&str> {
        self.channel_data
            .as_ref()
            .and_then(|c| c.tenant.as_ref())
            .map(|t| t.id.as_str())
            .or_else(|| {
                self.conversation
                    .as_ref()
                    .and_then(|c| c.tenant_id.as_deref())
            })
    }

    pub fn event_type(&self) -> Option<&str> {
        self.channel_data
            .as_ref()
            .and_then(|c| c.event_type.as_deref())
    }

    pub fn scope(&self) -> Scope {
        match self
            .conversation
            .as_ref()
            .and_then(|c| c.conversation_type.as_deref())
        {
            Some("channel") => Scope::Channel,
            Some("groupChat") => Scope::GroupChat,
            _ => Scope::Personal,
        }
    }

    pub fn conversation_id(&self) -> Option<&str> {
        self.conversation.as_ref().map(|c| c.id.as_str())
    }

    /// The channel a channel-scope activity belongs to: `channelData.channel.id`, else the
    /// conversation id without its thread suffix.
    pub fn channel(&self) -> Option<(String, Option<String>)> {
        if let Some(ch) = self.channel_data.as_ref().and_then(|c| c.channel.as_ref()) {
            return Some((ch.id.clone(), ch.name.clone()));
        }
        self.conversation_id()
            .map(|c| (c.split(";messageid=").next().unwrap_or(c).to_string(), None))
    }

    pub fn team(&self) -> Option<&IdName> {
        self.channel_data.as_ref().and_then(|c| c.team.as_ref())
    }

    /// The message this one replies to or quotes: `replyToId`, a `quotedReply` entity, or
    /// the `itemid` of a quoted reply in the HTML body.
    pub fn quoted_message(&self) -> Option<String> {
        if let Some(id) = self.reply_to_id.as_ref().filter(|s| !s.is_empty()) {
            return Some(id.clone());
        }
        for e in &self.entities {
            if e.get("type").and_then(Value::as_str) == Some("quotedReply")
                && let Some(id) = e
                    .get("quotedReply")
                    .and_then(|q| q.get("messageId"))
                    .and_then(Value::as_str)
            {
                return Some(id.to_string());
            }
        }
        for a in &self.attachments {
            if a.content_type == "text/html"
                && let Some(html) = a.content.as_ref().and_then(Value::as_str)
                && let Some(id) = super::html::quoted_item_id(html)
            {
                return Some(id);
            }
        }
        None
    }

    /// The rich body: the `text/html` attachment when there is one, else the text.
    pub fn html_body(&self) -> Option<&str> {
        self.attachments
            .iter()
            .find(|a| a.content_type == "text/html")
            .and_then(|a| a.content.as_ref())
            .and_then(Value::as_str)
            .or(self.text.as_deref())
    }
}
