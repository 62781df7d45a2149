// Command order-service is the Order Service of the online shop «Гоzон». It
// takes orders over HTTP, stores them in PostgreSQL, and talks to the Payment
// Service only through Kafka, using the transactional outbox pattern.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-healthcheck" {
		os.Exit(healthcheck(os.Getenv))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // from now on a second Ctrl-C kills at once
	}()
	if err := run(ctx, os.Getenv, os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "order-service: %v\n", err)
		os.Exit(1)
	}
}

// defaultHTTPAddr is loopback: the service trusts X-User-Id, so `go run .`
// on a laptop must not serve the network. Images and compose set ":8081".
const defaultHTTPAddr = "127.0.0.1:8081"

// Topic names of the Kafka contract and the consumer group (before
// KAFKA_TOPIC_PREFIX).
const (
	topicPayOrder       = "pay-order"
	topicPaymentResults = "payment-results"
	topicPaymentDLQ     = "payment-results.dlq"
	consumerGroup       = "order-service"
)

type config struct {
	HTTPAddr          string
	DatabaseURL       string
	KafkaBrokers      []string
	EmbeddedKafkaAddr string
	EmbeddedKafkaDir  string
	DemoPayments      bool
	TopicPrefix       string
	TopicPartitions   int32
	StartupTimeout    time.Duration
	ShutdownTimeout   time.Duration
	RelayBatchSize    int
	RelayWorkers      int
	RelayPollInterval time.Duration
	ProduceTimeout    time.Duration
	SessionTimeout    time.Duration
	RebalanceTimeout  time.Duration
	InstanceID        string
	GroupProtocol     string
	CreateBatchMax    int
	CreateWriters     int
	CreateQueueMax    int
	PprofAddr         string
	StreamsMax        int
	StreamsPerUser    int
	StreamLifetime    time.Duration
	LogLevel          slog.Level
	LogJSON           bool
}

func (c config) topic(name string) string { return c.TopicPrefix + name }

// loadConfig reads the environment; every variable has a default that makes
// `go run .` work on a developer machine. Every malformed variable is named
// in one error.
func loadConfig(getenv func(string) string) (config, error) {
	e := &env{getenv: getenv}
	c := config{
		HTTPAddr:          e.str("HTTP_ADDR", defaultHTTPAddr),
		DatabaseURL:       e.str("DATABASE_URL", ""),
		KafkaBrokers:      e.list("KAFKA_BROKERS"),
		EmbeddedKafkaAddr: e.str("EMBEDDED_KAFKA_ADDR", "127.0.0.1:9092"),
		EmbeddedKafkaDir:  e.str("EMBEDDED_KAFKA_DIR", defaultKafkaDir()),
		TopicPrefix:       e.str("KAFKA_TOPIC_PREFIX", ""),
		TopicPartitions:   int32(e.num("KAFKA_TOPIC_PARTITIONS", 3, 1, 1000)),
		StartupTimeout:    e.dur("STARTUP_TIMEOUT", 30*time.Second),
		ShutdownTimeout:   e.dur("SHUTDOWN_TIMEOUT", 10*time.Second),
		RelayBatchSize:    e.num("RELAY_BATCH_SIZE", 500, 1, 10000),
		RelayWorkers:      e.num("RELAY_WORKERS", 2, 1, 16),
		RelayPollInterval: e.dur("RELAY_POLL_INTERVAL", time.Second),
		ProduceTimeout:    e.dur("RELAY_PRODUCE_TIMEOUT", 10*time.Second),
		SessionTimeout:    e.dur("KAFKA_SESSION_TIMEOUT", 10*time.Second),
		RebalanceTimeout:  e.dur("KAFKA_REBALANCE_TIMEOUT", 60*time.Second),
		InstanceID:        e.str("KAFKA_GROUP_INSTANCE_ID", ""),
		GroupProtocol:     e.oneOf("KAFKA_GROUP_PROTOCOL", groupProtocolConsumer, groupProtocolClassic),
		CreateBatchMax:    e.num("CREATE_BATCH_MAX", 64, 1, 1000),
		CreateWriters:     e.num("CREATE_WRITERS", 2, 1, 64),
		CreateQueueMax:    e.num("CREATE_QUEUE_MAX", 512, 1, 100_000),
		PprofAddr:         e.str("PPROF_ADDR", ""),
		StreamsMax:        e.num("STREAMS_MAX", 1000, 1, 1_000_000),
		StreamsPerUser:    e.num("STREAMS_PER_USER", 10, 1, 10_000),
		StreamLifetime:    e.dur("STREAM_MAX_LIFETIME", 5*time.Minute),
		LogJSON:           e.oneOf("LOG_FORMAT", "text", "json") == "json",
	}
	// The demo Payment Service answers by default only where nobody else
	// can: on the embedded broker.
	c.DemoPayments = e.boolean("DEMO_PAYMENTS", len(c.KafkaBrokers) == 0)
	if err := c.LogLevel.UnmarshalText([]byte(e.str("LOG_LEVEL", "info"))); err != nil {
		e.errs = append(e.errs, fmt.Errorf("LOG_LEVEL: %w", err))
	}
	if err := errors.Join(e.errs...); err != nil {
		return c, fmt.Errorf("configuration: %w", err)
	}
	return c, nil
}

// env reads configuration variables and collects what is wrong with them.
type env struct {
	getenv func(string) string
	errs   []error
}

func (e *env) str(key, def string) string {
	if v := strings.TrimSpace(e.getenv(key)); v != "" {
		return v
	}
	return def
}

// list is a comma-separated list, empty items dropped.
func (e *env) list(key string) []string {
	var items []string
	for _, v := range strings.Split(e.str(key, ""), ",") {
		if v = strings.TrimSpace(v); v != "" {
			items = append(items, v)
		}
	}
	return items
}

func (e *env) dur(key string, def time.Duration) time.Duration {
	v := e.str(key, "")
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		e.errs = append(e.errs, fmt.Errorf("%s=%q: want a positive duration such as 1s or 500ms", key, v))
	}
	return d
}

func (e *env) num(key string, def, lo, hi int) int {
	v := e.str(key, "")
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < lo || n > hi {
		e.errs = append(e.errs, fmt.Errorf("%s=%q: want an integer from %d to %d", key, v, lo, hi))
	}
	return n
}

// oneOf is one of the given words, in any case; the first is the default.
func (e *env) oneOf(key string, words ...string) string {
	v := strings.ToLower(e.str(key, words[0]))
	if !slices.Contains(words, v) {
		e.errs = append(e.errs, fmt.Errorf("%s=%q: want %s", key, v, strings.Join(words, " or ")))
	}
	return v
}

func (e *env) boolean(key string, def bool) bool {
	switch v := strings.ToLower(e.str(key, "")); v {
	case "":
		return def
	case "true", "1", "yes":
		return true
	case "false", "0", "no":
		return false
	default:
		e.errs = append(e.errs, fmt.Errorf("%s=%q: want true or false", key, v))
		return def
	}
}

// defaultKafkaDir keeps the embedded broker's log in the user's cache.
func defaultKafkaDir() string {
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	return filepath.Join(cache, "order-service", "kafka")
}

// run is the whole program; main only adds the OS. Tests call it with their
// own environment and cancel ctx to shut it down.
func run(ctx context.Context, getenv func(string) string, stdout io.Writer) error {
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	log := newLogger(cfg, stdout)
	// stopBy is when shutdown must be over: zero until it begins. The
	// deferred closes wait for nothing past it (closeBefore).
	var stopBy time.Time
	db, err := connectDB(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer closeBefore(&stopBy, db.Close)
	if err := applySchema(ctx, db); err != nil {
		return err
	}
	brokers := cfg.KafkaBrokers
	if len(brokers) == 0 {
		kf, err := startEmbeddedKafka(cfg.EmbeddedKafkaAddr, cfg.EmbeddedKafkaDir)
		if err != nil {
			return fmt.Errorf("%w (is another order-service running? set EMBEDDED_KAFKA_ADDR or KAFKA_BROKERS)", err)
		}
		defer closeBefore(&stopBy, kf.Close)
		brokers = kf.ListenAddrs()
		log.Info("embedded kafka started", "addr", brokers[0], "data_dir", cfg.EmbeddedKafkaDir)
	}
	producer, err := newProducerClient(brokers)
	if err != nil {
		return fmt.Errorf("kafka producer: %w", err)
	}
	defer closeBefore(&stopBy, producer.Close)
	c, err := newConsumer(brokers, cfg, log, db, producer, newMetrics())
	if err != nil {
		return fmt.Errorf("kafka consumer: %w", err)
	}
	if cfg.PprofAddr != "" {
		defer servePprof(cfg.PprofAddr, log)()
	}
	tcp, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		c.group.Close()
		return fmt.Errorf("listen: %w", err)
	}
	maxConns, maxStreams := fdLimits(cfg.StreamsMax)
	if maxStreams < cfg.StreamsMax {
		log.Warn("fewer event streams than STREAMS_MAX: streams take at most half the connections "+
			"the process's file descriptors allow", "streams_max", maxStreams, "connections_max", maxConns)
	}
	ln := newLimitListener(tcp, maxConns)

	p := start(ctx, cfg, log, db, brokers, producer, c, maxStreams)
	p.metrics.conns = ln
	log.Info("http server listening", "addr", ln.Addr().String())
	srvErr := make(chan error, 1)
	go func() { srvErr <- p.srv.Serve(ln) }()
	select {
	case <-ctx.Done():
		err = nil
	case err = <-srvErr:
		err = fmt.Errorf("http server: %w", err)
	}
	stopBy = time.Now().Add(cfg.ShutdownTimeout)
	p.shutdown(stopBy)
	return err
}

// newLogger writes LOG_FORMAT lines at LOG_LEVEL to out, each with the
// trace_id and request_id of its context, repeated failures once per
// interval (quietHandler).
func newLogger(cfg config, out io.Writer) *slog.Logger {
	var handler slog.Handler = slog.NewTextHandler(out, &slog.HandlerOptions{Level: cfg.LogLevel})
	if cfg.LogJSON {
		handler = slog.NewJSONHandler(out, &slog.HandlerOptions{Level: cfg.LogLevel})
	}
	return slog.New(contextHandler{newQuietHandler(handler)})
}

// program is the running service: its HTTP server and its workers.
type program struct {
	cfg             config
	log             *slog.Logger
	srv             *http.Server
	metrics         *metrics
	producer, group *kgo.Client
	workers         sync.WaitGroup
	stopWork        context.CancelFunc // asks the workers to finish
	abort           context.CancelFunc // makes them abandon what is in flight
}

// start wires the service's parts and starts its workers; the server is
// returned ready to serve.
func start(ctx context.Context, cfg config, log *slog.Logger, db *pgxpool.Pool, brokers []string,
	producer *kgo.Client, c *consumer, maxStreams int) *program {
	m := c.metrics
	p := &program{cfg: cfg, log: log, producer: producer, group: c.group, metrics: m}
	m.consumerLag = func(ctx context.Context) (map[int32]int64, error) {
		return consumerLag(ctx, producer, cfg.topic(consumerGroup), cfg.topic(topicPaymentResults))
	}
	// Workers outlive ctx: they are stopped in order during shutdown.
	workCtx, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	// abortCtx ends when shutdown's budget is nearly spent: work still in
	// flight then is abandoned, which is safe to redo (see shutdown).
	abortCtx, abort := context.WithCancel(context.WithoutCancel(ctx))
	p.stopWork, p.abort = stopWork, abort
	wg := &p.workers
	wg.Go(func() {
		ensureTopics(workCtx, producer, log, cfg.TopicPartitions,
			cfg.topic(topicPayOrder), cfg.topic(topicPaymentResults), cfg.topic(topicPaymentDLQ))
	})
	notes := newNotifier(db, log, outboxChannel, statusChannel)
	notes.resync = func(ctx context.Context, _ string, orderIDs []string) ([]string, error) {
		return ordersNotPending(ctx, db, orderIDs) // only the event streams subscribe to one payload
	}
	wg.Go(func() { notes.run(workCtx) })
	orders := newOrderWriter(db, cfg.topic(topicPayOrder), cfg.CreateBatchMax, cfg.CreateQueueMax, m,
		func() { notes.announce(outboxChannel) })
	// Few writers make big batches: while one waits for its commit, the
	// requests arriving meanwhile gather for the next one.
	wg.Go(func() { orders.run(workCtx, cfg.CreateWriters) })
	wake, _ := notes.subscribe(outboxChannel, "")
	floor := &claimFloor{}
	r := &relay{db: db, kafka: producer, log: log, metrics: m, wake: wake, batchSize: cfg.RelayBatchSize,
		workers: cfg.RelayWorkers, pollInterval: cfg.RelayPollInterval, produceTimeout: cfg.ProduceTimeout, floor: floor}
	wg.Go(func() { r.run(workCtx, abortCtx) })
	wg.Go(func() { c.run(workCtx, abortCtx) })
	wg.Go(func() {
		session := setGroupSession(workCtx, c.group, log, cfg.topic(consumerGroup), cfg.GroupProtocol, cfg.SessionTimeout)
		m.groupSession.Store(int64(session))
		if session > 0 {
			log.Info("consumer group session", "group", cfg.topic(consumerGroup), "session", session)
		}
	})
	if cfg.DemoPayments {
		log.Info("demo payments on: orders up to the limit are PAID, larger ones FAILED", "limit", demoPaymentLimit)
		wg.Go(func() {
			if err := demoPayments(workCtx, brokers, cfg.topic(topicPayOrder), cfg.topic(topicPaymentResults),
				cfg.topic(consumerGroup)+"-demo-payments", log); err != nil {
				log.Error("demo payments stopped", "err", err)
			}
		})
	}
	m.streams = newStreamLimits(maxStreams, cfg.StreamsPerUser, cfg.StreamLifetime)
	p.srv = newServer(log, db, producer, notes, orders, m.streams, m, floor)
	return p
}

// shutdown stops the program by stopBy: stop taking requests and finish
// those in flight; let the relay finish its batch and the consumer commit
// what it applied; leave the group; flush the producer. All of it within
// SHUTDOWN_TIMEOUT, whatever the broker or the group do: the last fifth of
// the budget (at most 2s) is kept for leaving the group, and work still in
// flight when it begins is abandoned. That is safe to redo: unpublished rows
// stay in the outbox, uncommitted results are redelivered and change nothing.
func (p *program) shutdown(stopBy time.Time) {
	p.log.Info("shutting down")
	defer p.stopWork()
	defer p.abort()
	ctx, cancel := context.WithDeadline(context.Background(), stopBy)
	defer cancel()
	keep := min(p.cfg.ShutdownTimeout/5, 2*time.Second)
	defer time.AfterFunc(time.Until(stopBy)-keep, p.abort).Stop()
	if err := p.srv.Shutdown(ctx); err != nil {
		p.log.Warn("http shutdown", "err", err)
	}
	p.stopWork()
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.workers.Wait() // the relay's last batch is marked, the consumer's last poll committed
		if err := p.group.LeaveGroupContext(ctx); err != nil {
			p.log.Warn("leave consumer group", "err", err)
		}
		p.group.CloseAllowingRebalance()
		if err := p.producer.Flush(ctx); err != nil {
			p.log.Warn("flush producer", "err", err)
		}
	}()
	select {
	case <-done:
		p.log.Info("stopped")
	case <-ctx.Done():
		p.log.Error("shutdown budget spent, stopping anyway: unpublished events stay in the outbox, "+
			"uncommitted payment results will be redelivered", "budget", p.cfg.ShutdownTimeout)
	}
}

// closeBefore runs f, a deferred close, but waits for it no later than
// *deadline once that is set: shutdown ends within its budget even when a
// close hangs (a pool waiting for a connection an abandoned worker holds).
func closeBefore(deadline *time.Time, f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	if deadline.IsZero() {
		<-done
		return
	}
	select {
	case <-done:
	case <-time.After(time.Until(*deadline)):
	}
}
