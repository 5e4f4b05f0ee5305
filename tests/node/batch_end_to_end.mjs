// A batch end to end with OpenAI's official Node SDK, as a JavaScript user would run it: upload,
// create, poll, list, read the output. Every number OpenAI sends as a number must arrive as one:
// the SDK hands JSON values to the program as they are, so a count sent as a string stays one.
// Settings come from the environment: OPENAI_BASE_URL, OPENAI_API_KEY, MODEL, LINES.
import assert from "node:assert/strict";
import OpenAI, { toFile } from "openai";

const client = new OpenAI({ maxRetries: 0, timeout: 60_000 });
const model = process.env.MODEL;
const count = Number(process.env.LINES || "5");

function assertBatchTypes(batch) {
  for (const name of ["total", "completed", "failed"]) {
    assert.equal(typeof batch.request_counts[name], "number", `request_counts.${name}`);
  }
  for (const name of ["created_at", "expires_at"]) {
    assert.equal(typeof batch[name], "number", name);
  }
  if (batch.usage) {
    assert.equal(typeof batch.usage.input_tokens, "number", "usage.input_tokens");
    assert.equal(typeof batch.usage.output_tokens, "number", "usage.output_tokens");
    assert.equal(typeof batch.usage.total_tokens, "number", "usage.total_tokens");
    assert.equal(typeof batch.usage.input_tokens_details.cached_tokens, "number", "cached_tokens");
    assert.equal(typeof batch.usage.output_tokens_details.reasoning_tokens, "number", "reasoning_tokens");
  }
}

const lines = Array.from({ length: count }, (_, i) => JSON.stringify({
  custom_id: `n${i}`, method: "POST", url: "/v1/chat/completions",
  body: { model, messages: [{ role: "user", content: `hello ${i}` }] },
}));
const file = await client.files.create({
  file: await toFile(Buffer.from(lines.join("\n") + "\n"), "node.jsonl"), purpose: "batch",
});
assert.equal(typeof file.bytes, "number");
assert.equal(typeof file.created_at, "number");

let batch = await client.batches.create({
  input_file_id: file.id, endpoint: "/v1/chat/completions", completion_window: "24h",
});
assertBatchTypes(batch);
const deadline = Date.now() + 120_000;
while (!["completed", "failed", "expired", "cancelled"].includes(batch.status)) {
  assert.ok(Date.now() < deadline, `batch ${batch.id} still ${batch.status}`);
  await new Promise((resolve) => setTimeout(resolve, 300));
  batch = await client.batches.retrieve(batch.id);
  assertBatchTypes(batch);
}
assert.equal(batch.status, "completed");
assert.equal(batch.request_counts.completed, count);
assert.ok(batch.usage.input_tokens > 0 && batch.usage.output_tokens > 0);
assert.equal(batch.usage.total_tokens, batch.usage.input_tokens + batch.usage.output_tokens);

let listed = 0;
for await (const item of client.batches.list({ limit: 2 })) {
  assertBatchTypes(item);
  if (++listed >= 4) break;
}
assert.ok(listed > 0);

const output = (await (await client.files.content(batch.output_file_id)).text()).trim().split("\n");
assert.equal(output.length, count);
for (const line of output.map((text) => JSON.parse(text))) {
  assert.equal(typeof line.response.status_code, "number");
  assert.equal(typeof line.response.body.usage.prompt_tokens, "number");
}
console.log(JSON.stringify({ id: batch.id, usage: batch.usage, request_counts: batch.request_counts }));
