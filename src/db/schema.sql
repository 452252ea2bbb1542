CREATE TABLE IF NOT EXISTS public."user" (
    id integer PRIMARY KEY, created_on date, first_name character varying,
    last_name character varying, birth_date date, personal_code character varying);
CREATE TABLE IF NOT EXISTS public.loan (
    id integer PRIMARY KEY, client_id integer, amount double precision, created_on date,
    duration bigint, matured_on date, status character varying, updated_on date);
CREATE TABLE IF NOT EXISTS public.payment (
    id integer PRIMARY KEY, loan_id bigint, amount double precision, principle double precision,
    interest double precision, status character varying, created_on date);
