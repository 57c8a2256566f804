// The official JavaScript clients against chatd: ollama-js and the openai npm package.
// Usage: node clients.mjs BASE_URL MODEL; prints one JSON object of what each call returned.
import { Ollama } from "ollama";
import OpenAI from "openai";

const [base, model] = process.argv.slice(2);
const out = {};
const ollama = new Ollama({ host: base });

out.list = (await ollama.list()).models.map((m) => m.model);
out.version = (await ollama.version()).version;
const whole = await ollama.chat({ model, messages: [{ role: "user", content: "js says hi" }] });
out.chat = { content: whole.message.content, done_reason: whole.done_reason };
let streamed = "";
let chunks = 0;
for await (const part of await ollama.chat({
  model, messages: [{ role: "user", content: "js says hi" }], stream: true,
})) {
  streamed += part.message.content;
  chunks += 1;
}
out.chat_stream = { content: streamed, chunks };
out.generate = (await ollama.generate({ model, prompt: "js prompt" })).response;

const openai = new OpenAI({ baseURL: `${base}/v1`, apiKey: "unused" });
out.models = (await openai.models.list()).data.map((m) => m.id);
let text = "";
let usage = null;
let role = null;
for await (const chunk of await openai.chat.completions.create({
  model, messages: [{ role: "user", content: "js says hi" }], stream: true,
  stream_options: { include_usage: true },
})) {
  if (chunk.choices.length) {
    role = role ?? chunk.choices[0].delta.role ?? null;
    text += chunk.choices[0].delta.content ?? "";
  }
  if (chunk.usage) usage = chunk.usage;
}
out.openai_stream = { content: text, role, usage };
const done = await openai.chat.completions.create({
  model, messages: [{ role: "user", content: "js says hi" }],
});
out.openai = done.choices[0].message.content;
console.log(JSON.stringify(out));
