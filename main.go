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
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
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
	OutboxRetention   time.Duration
	PurgeInterval     time.Duration
	SessionTimeout    time.Duration
	InstanceID        string
	CreateBatchMax    int
	CreateWriters     int
	PprofAddr         string
	LogLevel          slog.Level
	LogJSON           bool
}

func (c config) topic(name string) string { return c.TopicPrefix + name }

// loadConfig reads the environment; every variable has a default that makes
// `go run .` work on a developer machine.
func loadConfig(getenv func(string) string) (config, error) {
	var errs []error
	str := func(key, def string) string {
		if v := strings.TrimSpace(getenv(key)); v != "" {
			return v
		}
		return def
	}
	dur := func(key string, def time.Duration) time.Duration {
		v := str(key, "")
		if v == "" {
			return def
		}
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			errs = append(errs, fmt.Errorf("%s=%q: want a positive duration such as 1s or 500ms", key, v))
		}
		return d
	}
	num := func(key string, def, lo, hi int) int {
		v := str(key, "")
		if v == "" {
			return def
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < lo || n > hi {
			errs = append(errs, fmt.Errorf("%s=%q: want an integer from %d to %d", key, v, lo, hi))
		}
		return n
	}

	c := config{
		HTTPAddr:          str("HTTP_ADDR", ":8081"),
		DatabaseURL:       str("DATABASE_URL", ""),
		EmbeddedKafkaAddr: str("EMBEDDED_KAFKA_ADDR", "127.0.0.1:9092"),
		EmbeddedKafkaDir:  str("EMBEDDED_KAFKA_DIR", ""),
		TopicPrefix:       str("KAFKA_TOPIC_PREFIX", ""),
		TopicPartitions:   int32(num("KAFKA_TOPIC_PARTITIONS", 3, 1, 1000)),
		StartupTimeout:    dur("STARTUP_TIMEOUT", 30*time.Second),
		ShutdownTimeout:   dur("SHUTDOWN_TIMEOUT", 10*time.Second),
		RelayBatchSize:    num("RELAY_BATCH_SIZE", 500, 1, 10000),
		RelayWorkers:      num("RELAY_WORKERS", 2, 1, 16),
		RelayPollInterval: dur("RELAY_POLL_INTERVAL", time.Second),
		ProduceTimeout:    dur("RELAY_PRODUCE_TIMEOUT", 10*time.Second),
		OutboxRetention:   dur("OUTBOX_RETENTION", 24*time.Hour),
		PurgeInterval:     dur("OUTBOX_PURGE_INTERVAL", 30*time.Second),
		SessionTimeout:    dur("KAFKA_SESSION_TIMEOUT", 45*time.Second),
		InstanceID:        str("KAFKA_GROUP_INSTANCE_ID", ""),
		CreateBatchMax:    num("CREATE_BATCH_MAX", 64, 1, 1000),
		CreateWriters:     num("CREATE_WRITERS", 2, 1, 64),
		PprofAddr:         str("PPROF_ADDR", ""),
	}
	for _, b := range strings.Split(str("KAFKA_BROKERS", ""), ",") {
		if b = strings.TrimSpace(b); b != "" {
			c.KafkaBrokers = append(c.KafkaBrokers, b)
		}
	}
	if c.EmbeddedKafkaDir == "" {
		cache, err := os.UserCacheDir()
		if err != nil {
			cache = os.TempDir()
		}
		c.EmbeddedKafkaDir = filepath.Join(cache, "order-service", "kafka")
	}
	switch v := strings.ToLower(str("DEMO_PAYMENTS", "")); v {
	case "":
		c.DemoPayments = len(c.KafkaBrokers) == 0
	case "true", "1", "yes":
		c.DemoPayments = true
	case "false", "0", "no":
	default:
		errs = append(errs, fmt.Errorf("DEMO_PAYMENTS=%q: want true or false", v))
	}
	switch v := strings.ToLower(str("LOG_FORMAT", "text")); v {
	case "text":
	case "json":
		c.LogJSON = true
	default:
		errs = append(errs, fmt.Errorf("LOG_FORMAT=%q: want text or json", v))
	}
	if err := c.LogLevel.UnmarshalText([]byte(str("LOG_LEVEL", "info"))); err != nil {
		errs = append(errs, fmt.Errorf("LOG_LEVEL: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return c, fmt.Errorf("configuration: %w", err)
	}
	return c, nil
}

// run is the whole program; main only adds the OS. Tests call it with their
// own environment and cancel ctx to shut it down.
func run(ctx context.Context, getenv func(string) string, stdout io.Writer) error {
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	var handler slog.Handler = slog.NewTextHandler(stdout, &slog.HandlerOptions{Level: cfg.LogLevel})
	if cfg.LogJSON {
		handler = slog.NewJSONHandler(stdout, &slog.HandlerOptions{Level: cfg.LogLevel})
	}
	log := slog.New(contextHandler{handler}) // trace_id and request_id from the context

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
	group, err := newConsumerClient(brokers, cfg.topic(consumerGroup), cfg.topic(topicPaymentResults), log,
		cfg.SessionTimeout, cfg.InstanceID)
	if err != nil {
		return fmt.Errorf("kafka consumer: %w", err)
	}

	if cfg.PprofAddr != "" {
		defer servePprof(cfg.PprofAddr, log)()
	}
	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		group.Close()
		return fmt.Errorf("listen: %w", err)
	}

	m := newMetrics()
	m.consumerLag = func(ctx context.Context) (map[int32]int64, error) {
		return consumerLag(ctx, producer, cfg.topic(consumerGroup), cfg.topic(topicPaymentResults))
	}
	// Workers outlive ctx: they are stopped in order during shutdown.
	workCtx, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWork()
	// abortCtx ends when shutdown's budget is nearly spent: work still in
	// flight then is abandoned, which is safe to redo (see shutdown below).
	abortCtx, abort := context.WithCancel(context.WithoutCancel(ctx))
	defer abort()
	var wg sync.WaitGroup
	wg.Go(func() {
		ensureTopics(workCtx, producer, log, cfg.TopicPartitions,
			cfg.topic(topicPayOrder), cfg.topic(topicPaymentResults), cfg.topic(topicPaymentDLQ))
	})
	notes := newNotifier(db, log, outboxChannel, statusChannel)
	wg.Go(func() { notes.run(workCtx) })
	orders := newOrderWriter(db, cfg.topic(topicPayOrder), cfg.CreateBatchMax, m,
		func() { notes.announce(outboxChannel) })
	// Few writers make big batches: while one waits for its commit, the
	// requests arriving meanwhile gather for the next one.
	wg.Go(func() { orders.run(workCtx, cfg.CreateWriters) })
	wake, _ := notes.subscribe(outboxChannel, "")
	r := &relay{db: db, kafka: producer, log: log, metrics: m, wake: wake, batchSize: cfg.RelayBatchSize,
		workers: cfg.RelayWorkers, pollInterval: cfg.RelayPollInterval, produceTimeout: cfg.ProduceTimeout,
		retention: cfg.OutboxRetention, purgeInterval: cfg.PurgeInterval}
	wg.Go(func() { r.run(workCtx, abortCtx) })
	c := &consumer{db: db, group: group, producer: producer, dlqTopic: cfg.topic(topicPaymentDLQ), log: log, metrics: m}
	wg.Go(func() { c.run(workCtx, abortCtx) })
	if cfg.DemoPayments {
		log.Info("demo payments on: orders up to the limit are PAID, larger ones FAILED", "limit", demoPaymentLimit)
		wg.Go(func() {
			if err := demoPayments(workCtx, brokers, cfg.topic(topicPayOrder), cfg.topic(topicPaymentResults),
				cfg.topic(consumerGroup)+"-demo-payments", log); err != nil {
				log.Error("demo payments stopped", "err", err)
			}
		})
	}

	srv := newServer(log, db, producer, notes, orders, m)
	log.Info("http server listening", "addr", ln.Addr().String())
	srvErr := make(chan error, 1)
	go func() { srvErr <- srv.Serve(ln) }()

	select {
	case <-ctx.Done():
		err = nil
	case err = <-srvErr:
		err = fmt.Errorf("http server: %w", err)
	}

	// Shutdown order: stop taking requests and finish those in flight;
	// let the relay finish its batch and the consumer commit what it
	// applied; leave the group; flush the producer. All of it within
	// SHUTDOWN_TIMEOUT, whatever the broker or the group do: the last fifth
	// of the budget (at most 2s) is kept for leaving the group, and work
	// still in flight when it begins is abandoned. That is safe to redo:
	// unpublished rows stay in the outbox, uncommitted results are
	// redelivered and change nothing.
	log.Info("shutting down")
	stopBy = time.Now().Add(cfg.ShutdownTimeout)
	sctx, cancel := context.WithDeadline(context.Background(), stopBy)
	defer cancel()
	keep := min(cfg.ShutdownTimeout/5, 2*time.Second)
	defer time.AfterFunc(cfg.ShutdownTimeout-keep, abort).Stop()
	if serr := srv.Shutdown(sctx); serr != nil {
		log.Warn("http shutdown", "err", serr)
	}
	stopWork()
	done := make(chan struct{})
	go func() {
		defer close(done)
		wg.Wait() // the relay's last batch is marked, the consumer's last poll committed
		if lerr := group.LeaveGroupContext(sctx); lerr != nil {
			log.Warn("leave consumer group", "err", lerr)
		}
		group.CloseAllowingRebalance()
		if ferr := producer.Flush(sctx); ferr != nil {
			log.Warn("flush producer", "err", ferr)
		}
	}()
	select {
	case <-done:
		log.Info("stopped")
	case <-sctx.Done():
		log.Error("shutdown budget spent, stopping anyway: unpublished events stay in the outbox, "+
			"uncommitted payment results will be redelivered", "budget", cfg.ShutdownTimeout)
	}
	return err
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
