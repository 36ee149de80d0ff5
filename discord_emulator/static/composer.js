// The message box: plain messages (`@name` mentions), and slash commands as Discord's client offers them: a list
// of the synced commands after "/", the options (`/newchat topic: llamas`, or the first text option without its
// name: `/newchat llamas`), the bot's autocomplete choices for an option that has them.

import { escapeHtml } from "./markdown.js";

const SUB_COMMAND = 1;
const SUB_COMMAND_GROUP = 2;
const STRING = 3;
const AUTOCOMPLETE_DELAY_MS = 150;

const escapeRegExp = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

export class Composer {
  // ctx: { api(path, body), notice(text), names, commands(), channel(), members() }
  constructor(form, ctx) {
    this.form = form;
    this.ctx = ctx;
    this.input = form.querySelector("#message-input");
    this.popup = form.querySelector("#popup");
    this.items = [];
    this.active = 0;
    this.kind = null;
    this.enabled = false;
    this.quiet = false; // after a pick or Escape: no popup until the text changes
    this.sequence = 0;
    this.timer = null;
    this.input.addEventListener("keydown", (event) => this.keydown(event));
    this.input.addEventListener("input", () => {
      this.quiet = false;
      this.autosize();
      this.update();
    });
    this.popup.addEventListener("mousedown", (event) => {
      const item = event.target.closest("[data-index]");
      if (!item) return;
      event.preventDefault();
      this.pick(Number(item.dataset.index));
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
  }

  setEnabled(enabled) {
    this.enabled = enabled;
    this.input.disabled = !enabled;
    this.channelChanged();
  }

  channelChanged() {
    const channel = this.ctx.channel();
    const bot = "llama-bot";
    if (!this.enabled) this.input.placeholder = `${bot} is starting (loading the model)…`;
    else if (channel?.parent_id) this.input.placeholder = `Message ${channel.name} (a /newchat thread: no mention needed)`;
    else this.input.placeholder = `Message #${channel?.name ?? ""} (mention @${bot} to ask, / for commands)`;
    this.hide();
    if (this.enabled) this.input.focus();
  }

  autosize() {
    this.input.style.height = "auto";
    this.input.style.height = `${Math.min(this.input.scrollHeight, 240)}px`;
  }

  setText(text) {
    this.input.value = text;
    this.input.setSelectionRange(text.length, text.length);
    this.autosize();
  }

  // --- reading a command line ----------------------------------------------------------------------------------
  parse(text) {
    const match = /^\/(\S*)(\s[\s\S]*)?$/.exec(text);
    if (!match) return null;
    const name = match[1];
    const command = this.ctx.commands().find((c) => c.name === name);
    const rest = match[2] === undefined ? null : match[2].slice(1);
    const parsed = { name, command, rest, options: {}, focused: null, schema: [] };
    if (!command || rest === null) return parsed;
    parsed.schema = (command.options || []).filter((o) => o.type !== SUB_COMMAND && o.type !== SUB_COMMAND_GROUP);
    const names = parsed.schema.map((o) => escapeRegExp(o.name)).join("|");
    const found = names ? [...rest.matchAll(new RegExp(`(?:^|\\s)(${names}):`, "g"))] : [];
    if (found.length) {
      found.forEach((f, i) => {
        const end = i + 1 < found.length ? found[i + 1].index : rest.length;
        parsed.options[f[1]] = rest.slice(f.index + f[0].length, end).trim();
        parsed.focused = f[1];
      });
    } else {
      const first = parsed.schema.find((o) => o.type === STRING) || parsed.schema[0];
      if (first) {
        parsed.focused = first.name;
        if (rest.trim()) parsed.options[first.name] = rest.trim();
      }
    }
    return parsed;
  }

  // --- the popup above the box ---------------------------------------------------------------------------------
  update() {
    clearTimeout(this.timer);
    if (this.quiet) return this.hide();
    const text = this.input.value;
    const before = text.slice(0, this.input.selectionStart);
    const mention = /(^|\s)@([\w.-]*)$/.exec(before);
    if (!text.startsWith("/")) return mention ? this.showMentions(mention[2]) : this.hide();
    const parsed = this.parse(text);
    if (parsed.rest === null) return this.showCommands(parsed.name);
    if (!parsed.command) return this.hide(); // not a command: it goes as a plain message
    const option = parsed.schema.find((o) => o.name === parsed.focused);
    if (option?.autocomplete) return this.showAutocomplete(parsed, option);
    if (option?.choices?.length) {
      const typed = (parsed.options[option.name] || "").toLowerCase();
      const choices = option.choices.filter((c) => c.name.toLowerCase().includes(typed));
      return this.show("choices", `${option.name}`, choices.map((c) => this.choiceItem(parsed, option, c)));
    }
    return this.showSignature(parsed);
  }

  showCommands(prefix) {
    const commands = this.ctx.commands().filter((c) => c.name.startsWith(prefix.toLowerCase()));
    const items = commands.map((c) => ({
      name: c.name,
      html: `<span class="label">/${escapeHtml(c.name)}</span><span class="detail">${escapeHtml(c.description || "")}</span>`,
      apply: () => this.setText(`/${c.name} `),
    }));
    this.show("commands", commands.length ? "Commands" : "No commands match", items);
  }

  showSignature(parsed) {
    const schema = parsed.schema;
    const usage = schema.map((o) => (o.required ? `${o.name}:` : `[${o.name}:]`)).join(" ");
    const details = schema.map((o) => `<div class="hint-option"><b>${escapeHtml(o.name)}</b> ${escapeHtml(o.description || "")}</div>`);
    this.show("hint", `/${parsed.name} ${usage}`.trim(), [], details.join(""));
  }

  showMentions(prefix) {
    const members = this.ctx.members().filter((m) => m.username.toLowerCase().startsWith(prefix.toLowerCase()));
    const items = members.map((m) => ({
      html: `<span class="label">@${escapeHtml(m.username)}</span><span class="detail">${m.bot ? "APP" : escapeHtml(m.global_name || "")}</span>`,
      apply: () => {
        const cut = this.input.selectionStart;
        const head = this.input.value.slice(0, cut).replace(/@[\w.-]*$/, `@${m.username} `);
        this.setText(head + this.input.value.slice(cut));
      },
    }));
    if (!items.length) return this.hide();
    this.show("mentions", "Members", items);
  }

  showAutocomplete(parsed, option) {
    this.show("choices", `${option.name}: loading choices…`, []);
    const mine = ++this.sequence;
    this.timer = setTimeout(async () => {
      try {
        const answer = await this.ctx.api("autocomplete", { name: parsed.name, options: parsed.options, focused: option.name });
        if (mine !== this.sequence || this.quiet) return;
        const choices = answer.choices || [];
        const title = answer.responded ? (choices.length ? option.name : `${option.name}: no matches`) : "The bot did not answer";
        this.show("choices", title, choices.map((c) => this.choiceItem(parsed, option, c)));
      } catch (error) {
        if (mine === this.sequence) this.show("hint", `Autocomplete failed: ${error.message}`, []);
      }
    }, AUTOCOMPLETE_DELAY_MS);
  }

  choiceItem(parsed, option, choice) {
    return {
      html: `<span class="label">${escapeHtml(choice.name)}</span>`,
      apply: () => {
        const options = { ...parsed.options, [option.name]: String(choice.value) };
        const text = Object.entries(options).map(([k, v]) => `${k}:${v}`).join(" ");
        this.setText(`/${parsed.name} ${text}`);
      },
    };
  }

  show(kind, title, items, extra = "") {
    this.kind = kind;
    this.items = items;
    this.active = 0;
    const rows = items.map((item, i) => `<div class="popup-item ${kind}${i === 0 ? " active" : ""}" data-index="${i}">${item.html}</div>`);
    this.popup.innerHTML = `<div class="popup-title">${escapeHtml(title)}</div>${rows.join("")}${extra}`;
    this.popup.hidden = false;
  }

  hide() {
    this.popup.hidden = true;
    this.items = [];
    this.kind = null;
  }

  move(step) {
    if (!this.items.length) return;
    this.active = (this.active + step + this.items.length) % this.items.length;
    this.popup.querySelectorAll(".popup-item").forEach((e, i) => e.classList.toggle("active", i === this.active));
  }

  pick(index) {
    const item = this.items[index];
    if (!item) return;
    item.apply();
    this.quiet = this.kind === "choices";
    this.input.focus();
    this.update();
  }

  pickOnEnter() {
    if (!this.items.length) return false;
    if (this.kind === "mentions") return true;
    if (this.kind === "commands") return this.input.value.trim() !== `/${this.items[this.active].name}`;
    if (this.kind === "choices") {
      const parsed = this.parse(this.input.value);
      return Boolean(parsed?.focused && parsed.options[parsed.focused]);
    }
    return false;
  }

  keydown(event) {
    const open = !this.popup.hidden;
    if (open && (event.key === "ArrowDown" || event.key === "ArrowUp")) {
      event.preventDefault();
      this.move(event.key === "ArrowDown" ? 1 : -1);
    } else if (open && event.key === "Tab" && this.items.length) {
      event.preventDefault();
      this.pick(this.active);
    } else if (open && event.key === "Escape") {
      this.quiet = true;
      this.hide();
    } else if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      if (open && this.pickOnEnter()) this.pick(this.active);
      else this.submit();
    }
  }

  // --- sending ---------------------------------------------------------------------------------------------------
  async submit() {
    const text = this.input.value.trim();
    if (!text || !this.enabled) return;
    const parsed = text.startsWith("/") ? this.parse(text) : null;
    this.setText("");
    this.quiet = false;
    this.hide();
    if (parsed?.command) return this.runCommand(parsed);
    try {
      await this.ctx.api("messages", { content: text });
    } catch (error) {
      this.ctx.notice(`Your message could not be sent: ${error.message}`);
      this.setText(text);
    }
  }

  async runCommand(parsed) {
    const missing = parsed.schema.filter((o) => o.required && !parsed.options[o.name]).map((o) => o.name);
    if (missing.length) return this.ctx.notice(`/${parsed.name} needs ${missing.join(", ")}.`);
    try {
      const answer = await this.ctx.api("commands", { name: parsed.name, options: parsed.options });
      if (!answer.responded) this.ctx.notice("The application did not respond.");
    } catch (error) {
      this.ctx.notice(`/${parsed.name} failed: ${error.message}`);
    }
  }
}
