// One message as Discord's client draws it: the reply or command line above it, avatar, name, time, markdown
// content (with a blinking cursor while the bot's streaming mark is on it), files, embeds, buttons and selects,
// the thread it started, and the note on an ephemeral answer.

import { escapeHtml, plainPreview, renderMarkdown } from "./markdown.js";

export const EPHEMERAL = 1 << 6;
const LOADING = 1 << 7;
const CHAT_INPUT_COMMAND = 20;
const STREAMING_MARK = " \u258c"; // bot/reply_stream.py: shown after text that is still being written
const BUTTON_STYLES = { 1: "primary", 2: "secondary", 3: "success", 4: "danger", 5: "link" };

// Inline icons rather than emoji: a machine without an emoji font (a server, a CI browser) shows those as boxes.
export const ICONS = {
  thread: '<svg class="icon" viewBox="0 0 24 24" aria-hidden="true"><path fill="currentColor" d="M4 4h16v11H9l-5 4z" opacity=".9"/></svg>',
  eye: '<svg class="icon" viewBox="0 0 24 24" aria-hidden="true"><path fill="currentColor" d="M12 5C6 5 2 12 2 12s4 7 10 7 10-7 10-7-4-7-10-7zm0 11a4 4 0 1 1 0-8 4 4 0 0 1 0 8z"/></svg>',
  bot: '<svg viewBox="0 0 24 24" width="60%" height="60%" aria-hidden="true"><path fill="white" d="M9 2h2v3h2V2h2v3.2A5 5 0 0 1 18 10v7a5 5 0 0 1-5 5h-2a5 5 0 0 1-5-5v-7a5 5 0 0 1 3-4.8zm1 9a1.2 1.2 0 1 0 0 2.4A1.2 1.2 0 0 0 10 11zm4 0a1.2 1.2 0 1 0 0 2.4 1.2 1.2 0 0 0 0-2.4z"/></svg>',
  clip: '<svg class="icon" viewBox="0 0 24 24" aria-hidden="true"><path fill="none" stroke="currentColor" stroke-width="2" d="M8 12l6-6a3 3 0 0 1 4 4l-8 8a5 5 0 0 1-7-7l7-7"/></svg>',
};

const COLORS = ["#5865f2", "#eb459e", "#57f287", "#fee75c", "#ed4245", "#3ba55c", "#faa61a", "#9b59b6"];
export const displayName = (user) => (user.bot ? user.username : user.global_name || user.username);
export const colorOf = (id) => COLORS[Number(BigInt(id) % BigInt(COLORS.length))];

export function avatar(user, id = "") {
  const face = user.bot ? ICONS.bot : escapeHtml(displayName(user)[0].toUpperCase());
  return `<div class="avatar"${id ? ` id="${id}"` : ""} style="background:${user.bot ? "var(--blurple)" : colorOf(user.id)}">${face}</div>`;
}

// view: { names (markdown.js), streamed: IDs seen with the streaming mark, failed: IDs whose last click failed }
export function messageElement(m, view) {
  const author = m.author;
  let content = m.content || "";
  const streaming = author.bot && content.endsWith(STREAMING_MARK);
  if (streaming) {
    content = content.slice(0, -STREAMING_MARK.length);
    view.streamed.add(m.id);
  }
  const classes = ["message", author.bot ? "bot" : "", m.flags & EPHEMERAL ? "ephemeral" : "", streaming ? "streaming" : "",
    m.flags & LOADING ? "loading" : ""].filter(Boolean);
  const element = document.createElement("article");
  element.className = classes.join(" ");
  element.dataset.id = m.id;
  element.dataset.author = author.username;
  if (view.streamed.has(m.id)) element.dataset.streamed = "1";
  const referenced = m.referenced_message;
  if (referenced) element.dataset.replyAuthor = referenced.author.username;
  const parts = [];
  if (referenced) {
    parts.push(`<div class="reply-ref"><span class="reply-name">@${escapeHtml(displayName(referenced.author))}</span> ${escapeHtml(plainPreview(referenced.content, view.names))}</div>`);
  } else if (m.interaction_metadata && m.type === CHAT_INPUT_COMMAND) {
    const who = m.interaction_metadata.user;
    const command = m.demo_command ? `/${m.demo_command}` : "a command";
    parts.push(`<div class="reply-ref"><span class="reply-name">${escapeHtml(displayName(who))}</span> used <span class="command-name">${escapeHtml(command)}</span></div>`);
  }
  const time = new Date(m.timestamp);
  const edited = m.edited_timestamp && !author.bot ? ' <span class="edited">(edited)</span>' : "";
  let body;
  if (m.flags & LOADING) body = `<div class="content thinking">${escapeHtml(author.username)} is thinking<span class="dots"></span></div>`;
  else body = `<div class="content">${renderMarkdown(content, view.names)}${streaming ? '<span class="cursor"></span>' : ""}${edited}</div>`;
  parts.push(`<div class="gutter">${avatar(author)}</div><div class="body">
    <header><span class="author" style="${author.bot ? "" : `color:${colorOf(author.id)}`}">${escapeHtml(displayName(author))}</span>${author.bot ? '<span class="tag">APP</span>' : ""}
    <time datetime="${m.timestamp}" title="${escapeHtml(time.toLocaleString())}">${escapeHtml(time.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }))}</time></header>
    ${body}${attachments(m)}${embeds(m, view.names)}${components(m, view.failed)}${threadLink(m)}${ephemeralNote(m)}</div>`);
  element.innerHTML = parts.join("");
  return element;
}

function attachments(m) {
  if (!m.attachments?.length) return "";
  return `<div class="attachments">${m.attachments.map((a) =>
    `<a class="attachment" href="${escapeHtml(a.url)}" target="_blank" download="${escapeHtml(a.filename)}">${ICONS.clip} ${escapeHtml(a.filename)} <small>${Math.ceil(a.size / 1024)} KB</small></a>`).join("")}</div>`;
}

function embeds(m, names) {
  return (m.embeds || []).map((e) => `<div class="embed">${e.title ? `<div class="embed-title">${escapeHtml(e.title)}</div>` : ""}
    ${e.description ? `<div class="embed-description">${renderMarkdown(e.description, names)}</div>` : ""}</div>`).join("");
}

function components(m, failedIds) {
  const rows = (m.components || []).map((row) => {
    const items = (row.components || []).map((c) => {
      if (c.type === 2) {
        const style = BUTTON_STYLES[c.style] || "secondary";
        const label = `${c.emoji?.name ? escapeHtml(c.emoji.name) + " " : ""}${escapeHtml(c.label || "")}`;
        if (c.style === 5) return `<a class="button link" href="${escapeHtml(c.url)}" target="_blank">${label} ↗</a>`;
        return `<button class="button ${style}" data-custom-id="${escapeHtml(c.custom_id)}" data-message="${m.id}"${c.disabled ? " disabled" : ""}>${label}</button>`;
      }
      if (c.type === 3) {
        const options = (c.options || []).map((o) => `<option value="${escapeHtml(o.value)}">${escapeHtml(o.label)}</option>`).join("");
        return `<select class="select" data-custom-id="${escapeHtml(c.custom_id)}" data-message="${m.id}"${c.disabled ? " disabled" : ""}>
          <option value="" selected disabled>${escapeHtml(c.placeholder || "Make a selection")}</option>${options}</select>`;
      }
      return "";
    });
    return `<div class="action-row">${items.join("")}</div>`;
  });
  const failed = failedIds.has(m.id) ? '<div class="interaction-failed">This interaction failed</div>' : "";
  return rows.length ? `<div class="components">${rows.join("")}</div>${failed}` : "";
}

function threadLink(m) {
  if (!m.thread) return "";
  return `<a class="thread-link" href="#${m.thread.id}" data-channel="${m.thread.id}">${ICONS.thread} ${escapeHtml(m.thread.name)} <span>Open thread ›</span></a>`;
}

function ephemeralNote(m) {
  if (!(m.flags & EPHEMERAL)) return "";
  return `<div class="ephemeral-note">${ICONS.eye} Only you can see this • <button class="dismiss" data-dismiss="${m.id}">Dismiss message</button></div>`;
}

export function noticeElement(text) {
  const element = document.createElement("article");
  element.className = "message notice ephemeral";
  element.innerHTML = `<div class="gutter"><div class="avatar system">!</div></div><div class="body"><header><span class="author">System</span></header>
    <div class="content">${escapeHtml(text)}</div><div class="ephemeral-note">${ICONS.eye} Only you can see this</div></div>`;
  return element;
}
