// testserver: a tiny static HTTP server for the cluster tests. It logs a line at start and for
// every request (read back with `kubectl logs`) and answers "hello from <hostname>".
// PROBE_URLS (comma-separated) are fetched every 2 s and each result is logged, which shows
// from the outside that the pod reaches them (the host, the kubernetes Service...).
package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func probe(urls []string) {
	client := &http.Client{
		Timeout: 3 * time.Second,
		// The image has no CA bundle; reachability, not identity, is what is being probed.
		Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}},
	}
	for {
		for _, url := range urls {
			resp, err := client.Get(url)
			if err != nil {
				log.Printf("probe %s: error %v", url, err)
				continue
			}
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
			resp.Body.Close()
			log.Printf("probe %s: status %d body %q", url, resp.StatusCode, strings.TrimSpace(string(body)))
		}
		time.Sleep(2 * time.Second)
	}
}

func main() {
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	hostname, _ := os.Hostname()
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		log.Printf("request %s %s from %s", r.Method, r.URL.Path, r.RemoteAddr)
		fmt.Fprintf(w, "hello from %s\n", hostname)
	})
	server := &http.Server{Addr: ":" + port, Handler: mux}
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
		log.Printf("shutting down")
		server.Shutdown(context.Background())
	}()
	if urls := os.Getenv("PROBE_URLS"); urls != "" {
		go probe(strings.Split(urls, ","))
	}
	log.Printf("testserver %s listening on :%s", hostname, port)
	if err := server.ListenAndServe(); err != nil && err != http.ErrServerClosed {
		log.Fatal(err)
	}
}
