package main

// contract_test.go: the contracts hold. /metrics parses as Prometheus text
// and counts what happened. The documents beside the code — openapi.yaml, asyncapi.yaml, compose.yaml,
// Dockerfile — are parsed here and held to the code, so that none of them can
// drift from what the service does. compose.yaml and the Dockerfile cannot be
// run on the development machine (no Docker engine); these checks are what
// keeps them honest.

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

type routeRecorder struct{ patterns []string }

func (r *routeRecorder) Handle(pattern string, _ http.Handler) {
	r.patterns = append(r.patterns, pattern)
}

// openapi.yaml (OpenAPI 3.1) documents every route addRoutes registers and no
// other, and every $ref in it resolves.
func TestOpenAPIDocumentsEveryRouteAndNoOther(t *testing.T) {
	var spec struct {
		OpenAPI string                           `yaml:"openapi"`
		Paths   map[string]map[string]*yaml.Node `yaml:"paths"`
	}
	if err := yaml.Unmarshal(openapiYAML, &spec); err != nil {
		t.Fatalf("openapi.yaml: %v", err)
	}
	if !strings.HasPrefix(spec.OpenAPI, "3.1.") {
		t.Errorf("openapi %q, want 3.1.x", spec.OpenAPI)
	}
	var documented []string
	for path, ops := range spec.Paths {
		for method := range ops {
			switch method {
			case "get", "post", "put", "patch", "delete", "head", "options":
				documented = append(documented, strings.ToUpper(method)+" "+path)
			}
		}
	}
	rec := &routeRecorder{}
	addRoutes(rec, nil, nil, nil, nil, nil, nil, newMetrics(), gauges{}, nil)
	slices.Sort(documented)
	slices.Sort(rec.patterns)
	for _, p := range rec.patterns {
		if !slices.Contains(documented, p) {
			t.Errorf("route %q is registered but not in openapi.yaml", p)
		}
	}
	for _, d := range documented {
		if !slices.Contains(rec.patterns, d) {
			t.Errorf("openapi.yaml documents %q, which is not registered", d)
		}
	}

	// Every $ref points at something.
	refs := regexp.MustCompile(`\$ref: '#/([^']+)'`).FindAllStringSubmatch(string(openapiYAML), -1)
	var doc map[string]any
	yaml.Unmarshal(openapiYAML, &doc)
	for _, m := range refs {
		var node any = doc
		for _, part := range strings.Split(m[1], "/") {
			mm, _ := node.(map[string]any)
			node = mm[part]
		}
		if node == nil {
			t.Errorf("dangling $ref #/%s", m[1])
		}
	}
}

// asyncapi.yaml names the topics and consumer group the service uses, the pay-
// order fields and headers it sends, the payment-result fields it reads and
// the DLQ's headers.
func TestAsyncAPIMatchesTheKafkaContract(t *testing.T) {
	var spec struct {
		AsyncAPI string `yaml:"asyncapi"`
		Channels map[string]struct {
			Address string `yaml:"address"`
		} `yaml:"channels"`
		Operations map[string]struct {
			Bindings struct {
				Kafka struct {
					GroupID struct {
						Enum []string `yaml:"enum"`
					} `yaml:"groupId"`
				} `yaml:"kafka"`
			} `yaml:"bindings"`
		} `yaml:"operations"`
		Components struct {
			Messages map[string]struct {
				Headers struct {
					Required []string `yaml:"required"`
				} `yaml:"headers"`
				Payload struct {
					Required   []string       `yaml:"required"`
					Properties map[string]any `yaml:"properties"`
				} `yaml:"payload"`
			} `yaml:"messages"`
		} `yaml:"components"`
	}
	if err := yaml.Unmarshal(asyncapiYAML, &spec); err != nil {
		t.Fatalf("asyncapi.yaml: %v", err)
	}
	if !strings.HasPrefix(spec.AsyncAPI, "3.") {
		t.Errorf("asyncapi %q, want 3.x", spec.AsyncAPI)
	}
	var addrs []string
	for _, c := range spec.Channels {
		addrs = append(addrs, c.Address)
	}
	slices.Sort(addrs)
	if want := []string{topicPayOrder, topicPaymentResults, topicPaymentDLQ}; !slices.Equal(addrs, want) {
		t.Errorf("channels %v, want %v", addrs, want)
	}
	if g := spec.Operations["consumePaymentResults"].Bindings.Kafka.GroupID.Enum; !slices.Equal(g, []string{consumerGroup}) {
		t.Errorf("consumer group %v, want %s", g, consumerGroup)
	}

	// pay-order: the documented fields are exactly what the relay sends.
	b, _, s := startStack(t)
	o := s.createOrder(t, newUser(), 1)
	readPayOrders(t, b, []string{o.ID}, 10*time.Second)
	var sent map[string]any
	for _, r := range readTopicNow(t, b, b.topic(topicPayOrder)) {
		if err := json.Unmarshal(r.Value, &sent); err != nil {
			t.Fatalf("pay-order value %s: %v", r.Value, err)
		}
	}
	pay := spec.Components.Messages["PayOrder"]
	if got, want := sortedKeys(sent), sorted(pay.Payload.Required); !slices.Equal(got, want) {
		t.Errorf("pay-order fields: sent %v, documented as required %v", got, want)
	}
	if !slices.Equal(pay.Headers.Required, []string{"event-id"}) {
		t.Errorf("pay-order headers %v", pay.Headers.Required)
	}

	// payment-results: the documented fields are the ones the consumer reads.
	res := spec.Components.Messages["PaymentResult"]
	var tags []string
	for f := range reflect.TypeFor[paymentResult]().Fields() {
		tag, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		tags = append(tags, tag)
	}
	if got := sortedKeys(res.Payload.Properties); !slices.Equal(got, sorted(tags)) {
		t.Errorf("payment-result properties %v, consumer reads %v", got, tags)
	}
	dlq := spec.Components.Messages["DeadLetter"]
	if !slices.Equal(sorted(dlq.Headers.Required), []string{"error", "original-offset", "original-partition", "original-topic"}) {
		t.Errorf("DLQ headers %v", dlq.Headers.Required)
	}
}

// A comma in an unquoted YAML flow value ({description: a, b}) silently
// splits it into a second key with no value. Neither spec has a legitimate
// empty value, so any is that mistake.
func TestSpecsHaveNoEmptyValues(t *testing.T) {
	for name, raw := range map[string][]byte{"openapi.yaml": openapiYAML, "asyncapi.yaml": asyncapiYAML} {
		var doc any
		if err := yaml.Unmarshal(raw, &doc); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var walk func(path string, v any)
		walk = func(path string, v any) {
			switch v := v.(type) {
			case nil:
				t.Errorf("%s: %s has no value (an unquoted comma?)", name, path)
			case map[string]any:
				for k, c := range v {
					walk(path+"/"+k, c)
				}
			case []any:
				for i, c := range v {
					walk(fmt.Sprintf("%s[%d]", path, i), c)
				}
			}
		}
		walk("", doc)
	}
}

// The service serves its own contracts, byte for byte: GET /openapi.yaml and
// /asyncapi.yaml, as application/yaml.
func TestSpecsAreServed(t *testing.T) {
	_, _, s := startStack(t)
	for path, want := range map[string][]byte{"/openapi.yaml": openapiYAML, "/asyncapi.yaml": asyncapiYAML} {
		r := do(t, "GET", s.url+path, "")
		if r.status != 200 || string(r.body) != string(want) || r.header.Get("Content-Type") != "application/yaml" {
			t.Errorf("GET %s: %d %q, %d bytes", path, r.status, r.header.Get("Content-Type"), len(r.body))
		}
	}
}

// compose.yaml runs what the service needs, as the service reads it: the
// variables it sets are ones the service reads, with values it accepts, and
// the broker and database it waits for are healthy first.
func TestComposeFileMatchesTheService(t *testing.T) {
	raw, err := os.ReadFile("compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	type service struct {
		Image       string            `yaml:"image"`
		Build       string            `yaml:"build"`
		Environment map[string]string `yaml:"environment"`
		Ports       []string          `yaml:"ports"`
		Volumes     []string          `yaml:"volumes"`
		DependsOn   map[string]struct {
			Condition string `yaml:"condition"`
		} `yaml:"depends_on"`
		Healthcheck struct {
			Test []string `yaml:"test"`
		} `yaml:"healthcheck"`
	}
	var compose struct {
		Services map[string]service `yaml:"services"`
		Volumes  map[string]any     `yaml:"volumes"`
	}
	if err := yaml.Unmarshal(raw, &compose); err != nil {
		t.Fatalf("compose.yaml: %v", err)
	}
	pg, kafka, app := compose.Services["postgres"], compose.Services["kafka"], compose.Services["order-service"]
	for name, s := range compose.Services {
		if len(s.Healthcheck.Test) == 0 {
			t.Errorf("service %s has no healthcheck", name)
		}
	}

	// PostgreSQL: the official image, pg_isready, data on a named volume.
	if !strings.HasPrefix(pg.Image, "postgres:") || !strings.Contains(strings.Join(pg.Healthcheck.Test, " "), "pg_isready") {
		t.Errorf("postgres: image %q healthcheck %v", pg.Image, pg.Healthcheck.Test)
	}
	if len(pg.Volumes) == 0 || compose.Volumes[strings.Split(pg.Volumes[0], ":")[0]] == nil && !strings.HasPrefix(pg.Volumes[0], "pgdata:") {
		t.Errorf("postgres volumes %v", pg.Volumes)
	}

	// Kafka: apache/kafka in KRaft mode, a listener for containers and one
	// published to the host.
	ke := kafka.Environment
	if !strings.HasPrefix(kafka.Image, "apache/kafka:") || ke["KAFKA_PROCESS_ROLES"] != "broker,controller" {
		t.Errorf("kafka: image %q roles %q", kafka.Image, ke["KAFKA_PROCESS_ROLES"])
	}
	if id, err := base64.RawURLEncoding.DecodeString(ke["CLUSTER_ID"]); err != nil || len(id) != 16 {
		t.Errorf("CLUSTER_ID %q is not a base64url UUID", ke["CLUSTER_ID"])
	}
	advertised := strings.Split(ke["KAFKA_ADVERTISED_LISTENERS"], ",")
	listenerOf := func(hostport string) string {
		for _, l := range advertised {
			name, addr, _ := strings.Cut(l, "://")
			if addr == hostport {
				return name
			}
		}
		return ""
	}

	// The service: built from the Dockerfile, started after healthy
	// dependencies, configured with variables it actually reads.
	if app.Build != "." {
		t.Errorf("order-service build %q, want the Dockerfile in .", app.Build)
	}
	for _, dep := range []string{"postgres", "kafka"} {
		if app.DependsOn[dep].Condition != "service_healthy" {
			t.Errorf("order-service depends_on %s: %+v", dep, app.DependsOn[dep])
		}
	}
	known := map[string]bool{}
	cfg, err := loadConfig(func(k string) string {
		known[k] = true
		return app.Environment[k]
	})
	if err != nil {
		t.Fatalf("the compose environment does not load: %v", err)
	}
	for k := range app.Environment {
		if !known[k] {
			t.Errorf("compose sets %s, which the service does not read", k)
		}
	}
	if !cfg.DemoPayments {
		t.Error("DEMO_PAYMENTS is not on: docker compose up would leave orders PENDING")
	}
	if len(cfg.KafkaBrokers) != 1 || listenerOf(cfg.KafkaBrokers[0]) == "" {
		t.Errorf("KAFKA_BROKERS %v is not an advertised listener %v", cfg.KafkaBrokers, advertised)
	}
	if l := listenerOf(cfg.KafkaBrokers[0]); l == "" || !strings.Contains(ke["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"], l+":PLAINTEXT") {
		t.Errorf("listener %q has no PLAINTEXT protocol", l)
	}
	hostListener := false
	for _, p := range kafka.Ports { // [ip:]host:container
		parts := strings.Split(p, ":")
		if listenerOf("localhost:"+parts[len(parts)-2]) != "" {
			hostListener = true
		}
	}
	if !hostListener {
		t.Errorf("no Kafka port %v published for a host listener in %v", kafka.Ports, advertised)
	}
	db, err := url.Parse(app.Environment["DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	pass, _ := db.User.Password()
	if db.Hostname() != "postgres" || db.User.Username() != pg.Environment["POSTGRES_USER"] ||
		pass != pg.Environment["POSTGRES_PASSWORD"] || db.Path != "/"+pg.Environment["POSTGRES_DB"] {
		t.Errorf("DATABASE_URL %s does not match the postgres service %v", db.Redacted(), pg.Environment)
	}
	_, port, _ := strings.Cut(cfg.HTTPAddr, ":")
	if !slices.Contains(app.Ports, port+":"+port) {
		t.Errorf("order-service ports %v do not publish HTTP_ADDR %s", app.Ports, cfg.HTTPAddr)
	}
	if !slices.Equal(app.Healthcheck.Test, []string{"CMD", "/order-service", "-healthcheck"}) {
		t.Errorf("order-service healthcheck %v", app.Healthcheck.Test)
	}
}

// The Dockerfile builds a static binary into a minimal image that runs as a
// non-root user, listens on every interface (HTTP_ADDR=:8081) on the port it
// exposes, and checks its own health with the binary's -healthcheck.
func TestDockerfileBuildsAStaticNonRootImage(t *testing.T) {
	raw, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	var froms []string
	var user, expose, health, addr string
	sc := bufio.NewScanner(strings.NewReader(string(raw)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "FROM":
			froms = append(froms, f[1])
		case "USER":
			user = f[1]
		case "EXPOSE":
			expose = f[1]
		case "HEALTHCHECK":
			health = sc.Text()
		case "ENV":
			if v, ok := strings.CutPrefix(f[1], "HTTP_ADDR="); ok {
				addr = v
			}
		}
	}
	if len(froms) < 2 {
		t.Fatalf("want a multi-stage build, got FROM %v", froms)
	}
	// The builder's Go must be at least go.mod's.
	mod, _ := os.ReadFile("go.mod")
	goLine := regexp.MustCompile(`(?m)^go (\d+)\.(\d+)`).FindStringSubmatch(string(mod))
	builder := regexp.MustCompile(`^golang:(\d+)\.(\d+)`).FindStringSubmatch(froms[0])
	if goLine == nil || builder == nil || atoi(builder[1])*100+atoi(builder[2]) < atoi(goLine[1])*100+atoi(goLine[2]) {
		t.Errorf("builder %s is older than go.mod's go %v", froms[0], goLine)
	}
	final := froms[len(froms)-1]
	if !strings.Contains(final, "distroless/static") && final != "scratch" {
		t.Errorf("final image %s: want distroless static or scratch", final)
	}
	if !strings.Contains(string(raw), "CGO_ENABLED=0") {
		t.Error("the binary is not built with CGO_ENABLED=0")
	}
	if user == "" || strings.HasPrefix(user, "root") || user == "0" {
		t.Errorf("USER %q: want a non-root user", user)
	}
	if expose != "8081" || !strings.Contains(health, "-healthcheck") {
		t.Errorf("EXPOSE %q, HEALTHCHECK %q", expose, health)
	}
	// The default address is loopback: the image must set every interface.
	if addr != ":"+expose {
		t.Errorf("ENV HTTP_ADDR=%q: want %q, every interface on the exposed port", addr, ":"+expose)
	}
	ignore, _ := os.ReadFile(".dockerignore")
	sources, _ := filepath.Glob("*.go")
	var embedded []string
	for _, f := range sources {
		src, _ := os.ReadFile(f)
		for _, m := range embedRE.FindAllSubmatch(src, -1) {
			embedded = append(embedded, strings.Fields(string(m[1]))...)
		}
	}
	if len(embedded) == 0 {
		t.Fatal("no //go:embed directive found")
	}
	for _, name := range embedded {
		if strings.Contains(string(ignore), name) {
			t.Errorf(".dockerignore drops %s, which the binary embeds", name)
		}
	}
}

var embedRE = regexp.MustCompile(`(?m)^\s*//go:embed (.+)$`)

// The -healthcheck flag is the image's only probe: it must pass against a
// live service and fail against a dead one.
func TestHealthcheckFlag(t *testing.T) {
	_, _, s := startStack(t)
	probe := func(addr string) error {
		cmd := exec.Command(os.Args[0], "-healthcheck")
		cmd.Env = append(os.Environ(), childEnv+"=1", "HTTP_ADDR="+addr)
		return cmd.Run()
	}
	if err := probe(strings.TrimPrefix(s.url, "http://")); err != nil {
		t.Errorf("probe of a live service: %v", err)
	}
	if err := probe("127.0.0.1:" + freePort()); err == nil {
		t.Error("probe of a dead port passed")
	}
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

func sortedKeys[V any](m map[string]V) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

// The broker the tests run (.ci/kafka/pom.xml, fetched by .ci/kafka.sh) is
// the version compose.yaml's image carries: the suite's Kafka is the user's.
func TestKafkaVersionMatchesCompose(t *testing.T) {
	compose, err := os.ReadFile("compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	pom, err := os.ReadFile(".ci/kafka/pom.xml")
	if err != nil {
		t.Fatal(err)
	}
	image := regexp.MustCompile(`image: apache/kafka:(\S+)`).FindSubmatch(compose)
	pinned := regexp.MustCompile(`<kafka.version>([^<]+)</kafka.version>`).FindSubmatch(pom)
	if image == nil || pinned == nil {
		t.Fatalf("no version found: compose image %q, pom %q", image, pinned)
	}
	if string(image[1]) != string(pinned[1]) {
		t.Errorf("compose.yaml runs apache/kafka:%s but the tests fetch Kafka %s: change both together", image[1], pinned[1])
	}
}

// /metrics parses as Prometheus text (promtool) and counts what happened:
// orders, events, results, the DLQ, the consumer's lag.
func TestMetricsParseAndCount(t *testing.T) {
	b, dbURL, s := startStack(t)
	user := newUser()
	o := s.createOrder(t, user, 10)
	do(t, "POST", s.url+"/orders", `{"amount": 0}`, "X-User-Id", user)
	produce(t, b, b.topic(topicPaymentResults), o.ID, `{"order_id": "`+o.ID+`", "status": "PAID"}`, `garbage`)
	waitCommitted(t, b)
	waitDrained(t, dbURL) // the event published, so its latency observed
	s.getOrder(t, user, o.ID)

	r := do(t, "GET", s.url+"/metrics", "")
	if r.status != 200 || !strings.HasPrefix(r.header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("GET /metrics: %d %q", r.status, r.header.Get("Content-Type"))
	}
	types := map[string]string{}
	samples := map[string]float64{}
	for i, line := range strings.Split(strings.TrimSuffix(string(r.body), "\n"), "\n") {
		if m := typeRE.FindStringSubmatch(line); m != nil {
			types[m[1]] = m[2]
			continue
		}
		if helpRE.MatchString(line) {
			continue
		}
		m := sampleRE.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("line %d does not parse: %q", i+1, line)
			continue
		}
		family := m[1]
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(family, suffix); ok && (types[base] == "histogram" || types[base] == "summary") {
				family = base
			}
		}
		if types[family] == "" {
			t.Errorf("line %d: sample before its # TYPE: %q", i+1, line)
		}
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			t.Errorf("line %d: value %q", i+1, m[3])
		}
		samples[m[1]+m[2]] = v
	}
	for sample, want := range map[string]float64{
		"orders_created_total":                                     1,
		"outbox_events_published_total":                            1,
		`payment_results_applied_total{status="PAID"}`:             1,
		`payment_results_dlq_total{reason="invalid"}`:              1,
		`payment_results_dlq_total{reason="unknown_order"}`:        0,
		`payment_results_dlq_total{reason="refused"}`:              0,
		"outbox_backlog":                                           0,
		"order_publish_latency_seconds_count":                      1,
		"order_result_latency_seconds_count":                       1,
		"outbox_relay_batch_records_count":                         1,
		`outbox_relay_batch_records_bucket{le="1"}`:                1,
		"payment_results_consumer_lag_up":                          1,
		`go_info{version="` + runtime.Version() + `"}`:             1,
		`http_requests_total{route="POST /orders",code="201"}`:     1,
		`http_requests_total{route="POST /orders",code="400"}`:     1,
		`http_requests_total{route="GET /orders/{id}",code="200"}`: 1,
	} {
		if got, ok := samples[sample]; !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", sample, got, ok, want)
		}
	}
	// The group has committed both records of payment-results: no lag.
	var lag float64
	for p := range 3 {
		v, ok := samples[fmt.Sprintf(`payment_results_consumer_lag{partition="%d"}`, p)]
		if !ok {
			t.Errorf("no consumer lag for partition %d", p)
		}
		lag += v
	}
	if lag != 0 {
		t.Errorf("consumer lag %v after every result was committed", lag)
	}
	// Runtime and process metrics, with the names Prometheus users expect.
	for _, name := range []string{"go_goroutines", "go_threads", "go_memstats_heap_alloc_bytes", "go_memstats_sys_bytes",
		"go_gc_duration_seconds_count", "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
		"process_max_fds", "process_virtual_memory_bytes"} {
		if samples[name] <= 0 {
			t.Errorf("%s = %v, want > 0", name, samples[name])
		}
	}
	if start := samples["process_start_time_seconds"]; math.Abs(start-float64(time.Now().Unix())) > 3600 {
		t.Errorf("process_start_time_seconds %v, now %d", start, time.Now().Unix())
	}
	// Histogram buckets are cumulative and end at the count.
	prefix := `http_request_duration_seconds_bucket{route="POST /orders",le=`
	var last float64
	var les []string
	for _, b := range durationBuckets {
		les = append(les, strconv.FormatFloat(b, 'f', -1, 64))
	}
	for _, le := range append(les, "+Inf") {
		v, ok := samples[prefix+`"`+le+`"}`]
		if !ok || v < last {
			t.Errorf("bucket le=%s: %v (present %v) after %v", le, v, ok, last)
		}
		last = v
	}
	if c := samples[`http_request_duration_seconds_count{route="POST /orders"}`]; c != last || c != 2 {
		t.Errorf("count %v, +Inf bucket %v, want 2", c, last)
	}

	checkMetricsTable(t, types)

	// Prometheus's own linter, where it is installed (CI installs it).
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not found: install Debian's prometheus package to lint /metrics")
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(r.body)
	if out, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
	checkMonitoring(t, promtool, types)
}

var (
	sampleRE = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$`)
	helpRE   = regexp.MustCompile(`^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) \S.*$`)
	typeRE   = regexp.MustCompile(`^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary)$`)
)

// checkMonitoring holds monitoring/ to the service: every metric the alerting
// rules and the dashboard name is one /metrics serves (families: its TYPE
// lines); the rules and each dashboard query are valid PromQL (promtool check
// rules); the rules' unit tests pass (promtool test rules).
func checkMonitoring(t *testing.T, promtool string, families map[string]string) {
	t.Helper()
	rules, err := os.ReadFile("monitoring/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	b, err := os.ReadFile("monitoring/dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("dashboard.json: %v", err)
	}
	var exprs []string
	for _, p := range dash.Panels {
		for _, q := range p.Targets {
			exprs = append(exprs, q.Expr)
		}
	}
	if len(exprs) < 20 {
		t.Errorf("the dashboard has %d queries", len(exprs))
	}
	metricRE := regexp.MustCompile(`\b(?:orders?|outbox|payment_results|http|database|go|process)_[a-z0-9_]+\b`)
	for _, name := range metricRE.FindAllString(string(rules)+"\n"+strings.Join(exprs, "\n"), -1) {
		family := name
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && families[base] != "" {
				family = base
			}
		}
		if families[family] == "" {
			t.Errorf("monitoring/ names %s, which /metrics does not serve", name)
		}
	}
	// Each dashboard query as a recording rule, for promtool to parse.
	var gen strings.Builder
	gen.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	for i, e := range exprs {
		fmt.Fprintf(&gen, "      - record: dashboard:query%d\n        expr: %s\n", i, strconv.Quote(e))
	}
	genFile := t.TempDir() + "/dashboard-queries.yml"
	if err := os.WriteFile(genFile, []byte(gen.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"check", "rules", "monitoring/alerts.yml"},
		{"check", "rules", genFile},
		{"test", "rules", "monitoring/alerts_test.yml"},
	} {
		if out, err := exec.Command(promtool, args...).CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// checkMetricsTable holds docs/operations.md's table of metrics to /metrics
// (families: its TYPE lines): every metric the table names is served, and
// every family served has its row; a name ending in * stands for its prefix.
func checkMetricsTable(t *testing.T, families map[string]string) {
	t.Helper()
	named := map[string]bool{}
	var prefixes []string
	for _, line := range sectionLines(t, "docs/operations.md", "Metrics") {
		if !strings.HasPrefix(line, "| `") {
			continue
		}
		for _, m := range codeSpan.FindAllStringSubmatch(strings.Split(line, "|")[1], -1) {
			name, _, _ := strings.Cut(m[1], "{")
			if p, ok := strings.CutSuffix(name, "*"); ok {
				prefixes = append(prefixes, p)
				continue
			}
			named[name] = true
			if families[name] == "" {
				t.Errorf("docs/operations.md's metrics table names %s, which /metrics does not serve", name)
			}
		}
	}
	if len(named) < 10 {
		t.Fatalf("docs/operations.md's metrics table names %d metrics, want its table", len(named))
	}
	for f := range families {
		if !named[f] && !slices.ContainsFunc(prefixes, func(p string) bool { return strings.HasPrefix(f, p) }) {
			t.Errorf("/metrics serves %s, which docs/operations.md's metrics table does not name", f)
		}
	}
}
